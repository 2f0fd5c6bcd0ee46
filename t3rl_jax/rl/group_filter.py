"""Zero-variance group filter (host side, numpy).

A group whose episodes all earned the same reward has all-zero advantages: it costs a full
forward/backward and teaches nothing (and with token-mean aggregation it dilutes the other
groups' gradient). Such groups are dropped before batching; the trainer may refill the batch with
groups from extra rollouts (`top_up_groups`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Generic, TypeVar

import numpy as np

G = TypeVar("G")


@dataclasses.dataclass(frozen=True)
class FilterResult:
    kept_indices: np.ndarray  # int64 indices of groups with reward variance, in input order
    num_kept: int
    num_dropped: int


def has_reward_variance(rewards: np.ndarray, *, atol: float = 0.0) -> np.ndarray:
    """bool [num_groups]: True where a group's rewards are not all equal (spread > atol)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [num_groups, group_size], got shape {rewards.shape}")
    if not np.all(np.isfinite(rewards)):
        bad = np.argwhere(~np.isfinite(rewards))[0]
        raise ValueError(f"non-finite reward {rewards[tuple(bad)]} in group {bad[0]} at sample {bad[1]}")
    return (rewards.max(axis=1) - rewards.min(axis=1)) > atol


def filter_zero_variance(rewards: np.ndarray, *, atol: float = 0.0) -> FilterResult:
    """Indices of the groups to keep: those whose rewards are not all equal."""
    keep = has_reward_variance(rewards, atol=atol)
    kept = np.flatnonzero(keep)
    return FilterResult(kept_indices=kept, num_kept=int(kept.size), num_dropped=int(keep.size - kept.size))


@dataclasses.dataclass(frozen=True)
class TopUpResult(Generic[G]):
    groups: list[G]  # kept groups followed by accepted extras, at most `target`
    num_drawn: int  # extras consumed from the queue
    num_rejected: int  # drawn extras dropped for zero variance


def top_up_groups(
    kept: Sequence[G],
    extras: Iterable[G],
    target: int,
    rewards_of: Callable[[G], Sequence[float]],
    *,
    atol: float = 0.0,
) -> TopUpResult[G]:
    """Refill a filtered batch to `target` groups from a queue of extra groups.

    Draws from `extras` lazily (so a generator that launches rollouts on demand works) and stops as
    soon as the target is met or the queue is exhausted; extras without reward variance are
    rejected. Returns fewer than `target` groups if the queue runs dry.
    """
    if target < 0:
        raise ValueError(f"target must be >= 0, got {target}")
    groups = list(kept)[:target]
    drawn = rejected = 0
    iterator = iter(extras)
    while len(groups) < target:
        try:
            group = next(iterator)
        except StopIteration:
            break
        drawn += 1
        rewards = np.asarray(rewards_of(group), dtype=np.float64)[None, :]
        if has_reward_variance(rewards, atol=atol)[0]:
            groups.append(group)
        else:
            rejected += 1
    return TopUpResult(groups=groups, num_drawn=drawn, num_rejected=rejected)
