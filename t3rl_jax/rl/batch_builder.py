"""Kept GRPO groups -> training mini-batches: advantages -> packed rows -> context-parallel balance -> micro-batches.

Groups may differ in size (failed episodes are left out of theirs), so advantages come from the flat, group-id
form. Mini-batches are consecutive equal slices of the step's episodes in group order (slime's `--global-batch-size`
counts samples, not prompts); a slice may cut a group, whose advantages were taken over the whole group first. A
trajectory longer than a training row is trained on its first `train.max_seq_len` tokens with the advantage of the
whole episode's reward (as verl does) and counted in `length/truncated_episodes`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from t3rl_jax.models.context_parallel import load_balance_batch
from t3rl_jax.rl import batching
from t3rl_jax.rl.advantages import group_advantages_flat
from t3rl_jax.rl.train_step import micro_batch
from t3rl_jax.rollout.trajectory import Trajectory


def advantages_of(groups: list[list[Trajectory]], algo) -> list[np.ndarray]:
    """Per group, the advantage of each of its episodes (`algo.advantage`, `algo.adv_eps`)."""
    rewards = np.asarray([t.reward for g in groups for t in g], np.float32)
    ids = np.repeat(np.arange(len(groups)), [len(g) for g in groups]).astype(np.int32)
    flat = np.asarray(group_advantages_flat(jnp.asarray(rewards), jnp.asarray(ids), len(groups),
                                            mode=algo.advantage, eps=algo.adv_eps))
    return np.split(flat, np.cumsum([len(g) for g in groups])[:-1])


def build(groups: list[list[Trajectory]], cfg, *, rows_per_micro: int, cp: int) -> tuple[list[dict] | None, dict]:
    """Mini-batches of [micro, rows_per_micro, max_seq_len] arrays (None when no group is left) and batch stats."""
    if not groups:
        return None, {}
    episodes = [t for g in groups for t in g]
    adv = np.concatenate(advantages_of(groups, cfg.algo))
    parts = [p for p in np.array_split(np.arange(len(episodes)), cfg.train.mini_batches_per_step) if len(p)]
    minis, truncated, padding = [], 0, []
    for part in parts:
        packed = batching.pack([episodes[i] for i in part], adv[part], row_length=cfg.train.max_seq_len,
                               pad_rows_to_multiple=rows_per_micro)
        arrays = packed.as_dict()
        if cp > 1:
            arrays = load_balance_batch(arrays, cp)
        minis.append(micro_batch(arrays, packed.tokens.shape[0] // rows_per_micro))
        truncated += packed.num_truncated
        padding.append(float(1.0 - (packed.segment_ids > 0).mean()))
    stats = {"length/truncated_episodes": float(truncated), "length/padding_fraction": float(np.mean(padding))}
    return minis, stats
