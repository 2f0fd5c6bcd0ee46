"""One step's experience: prompts -> episode requests -> rolled-out GRPO groups ready for the batch builder.

Three policies live here and nowhere else:
- seeds: every episode's sampling seed is a pure function of (run seed, step, group, sample), so a resumed run
  replays the same rollouts;
- failed episodes (`termination == "env_failed"`: a worker timeout or crash fails every episode that worker held)
  carry no reward signal: `algo.failed_episodes="exclude"` leaves them out of their group (the group's statistics
  come from the episodes that ran), `"drop_group"` drops their whole group; a group left with fewer than two
  episodes has no baseline and is dropped;
- dynamic sampling (T3RL's): with the zero-variance filter on, groups whose episodes all scored the same are
  dropped (their advantages would be 0), and with `algo.refill_groups` further prompt batches are rolled out until
  `data.prompts_per_step` groups have reward variance, at most `algo.max_refill_batches` extra batches.

Multi-host, `rollout` runs this host's groups and returns every host's trajectories (`distributed.run_shared`), so
each decision here (kept groups, refills, when to stop) is computed from the same episodes on every host.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Iterator

import numpy as np

from t3rl_jax import data as data_lib
from t3rl_jax.evaluation import category_of
from t3rl_jax.rl.group_filter import has_reward_variance
from t3rl_jax.rollout.driver import EpisodeRequest
from t3rl_jax.rollout.trajectory import Trajectory

log = logging.getLogger(__name__)

FAILED_EPISODE_POLICIES = ("exclude", "drop_group")
ENV_FAILED = "env_failed"


@dataclasses.dataclass
class Experience:
    groups: list[list[Trajectory]]  # groups to train on (failed episodes already left out), in group-id order
    trajectories: list[Trajectory]  # every episode rolled out this step, refills included (for rollout metrics)
    stats: dict[str, float]         # episodes/*, groups/* counters


def episode_seed(run_seed: int, step: int, group: int, sample: int) -> int:
    digest = hashlib.blake2b(f"{run_seed}/{step}/{group}/{sample}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def requests_for(cfg, step: int, prompts: list[dict], first_group: int = 0) -> list[EpisodeRequest]:
    """`rollout.samples_per_prompt` requests per prompt; group ids continue from `first_group` (refills)."""
    out = []
    for g, record in enumerate(prompts, start=first_group):
        eid = data_lib.entry_id(record)
        for s in range(cfg.rollout.samples_per_prompt):
            out.append(EpisodeRequest(eid, group_id=g, sample_index=s, seed=episode_seed(cfg.seed, step, g, s),
                                      augment=cfg.env.augment, reward_kind=cfg.env.reward,
                                      category=category_of(eid)))
    return out


def _split_groups(trajs: list[Trajectory], num_groups: int, n: int) -> list[list[Trajectory]]:
    if len(trajs) != num_groups * n:
        raise ValueError(f"rollout returned {len(trajs)} trajectories for {num_groups} groups x {n} samples")
    return [trajs[g * n:(g + 1) * n] for g in range(num_groups)]


def episodes_that_ran(group: list[Trajectory], policy: str) -> list[Trajectory] | None:
    """The episodes of `group` to train on under the failed-episode `policy`, or None when the group is dropped."""
    if policy not in FAILED_EPISODE_POLICIES:
        raise ValueError(f"algo.failed_episodes {policy!r} is not one of {FAILED_EPISODE_POLICIES}")
    ran = [t for t in group if t.termination != ENV_FAILED]
    if len(ran) < len(group) and (policy == "drop_group" or len(ran) < 2):
        return None
    return ran


def collect(cfg, step: int, prompt_iter: Iterator[list[dict]],
            rollout: Callable[[list[EpisodeRequest]], list[Trajectory]]) -> Experience:
    """Roll out one batch of prompts (plus refills) and keep the groups worth training on.

    `rollout` runs requests and returns their trajectories in request order; it is called once per prompt batch
    (the caller decides whether rollout metrics accumulate across those calls).
    """
    n = cfg.rollout.samples_per_prompt
    target = cfg.data.prompts_per_step
    algo = cfg.algo
    policy = algo.failed_episodes
    every: list[Trajectory] = []
    kept: list[list[Trajectory]] = []
    counts = dict(dropped=0, dropped_env_failed=0, refill_batches=0, refill_drawn=0, refill_rejected=0)
    next_group = 0

    def roll(prompts: list[dict], *, refill: bool) -> None:
        nonlocal next_group
        trajs = rollout(requests_for(cfg, step, prompts, first_group=next_group))
        every.extend(trajs)
        next_group += len(prompts)
        for group in _split_groups(trajs, len(prompts), n):
            if refill and len(kept) >= target:
                break  # the rest of this refill batch is not needed
            counts["refill_drawn"] += int(refill)
            ran = episodes_that_ran(group, policy)
            if ran is None:
                counts["dropped_env_failed"] += 1
            elif algo.filter_zero_variance and not has_reward_variance(np.asarray([[t.reward for t in ran]]))[0]:
                counts["dropped"] += 1
                counts["refill_rejected"] += int(refill)
            else:
                kept.append(ran)

    roll(next(prompt_iter), refill=False)
    if algo.filter_zero_variance and algo.refill_groups:
        while len(kept) < target and counts["refill_batches"] < algo.max_refill_batches:
            counts["refill_batches"] += 1
            roll(next(prompt_iter), refill=True)
        if len(kept) < target:
            log.warning("step %d: refill stopped after %d extra prompt batches (algo.max_refill_batches=%d) with "
                        "%d of %d groups having reward variance", step, counts["refill_batches"],
                        algo.max_refill_batches, len(kept), target)
    failed = sum(t.termination == ENV_FAILED for t in every)
    stats = {f"groups/{k}": float(v) for k, v in counts.items()}
    stats.update({"groups/kept": float(len(kept)), "groups/short_of_target": float(max(target - len(kept), 0)),
                  "episodes/rolled_out": float(len(every)), "episodes/env_failed": float(failed)})
    return Experience(groups=kept, trajectories=every, stats=stats)
