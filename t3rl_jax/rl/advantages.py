"""Group-relative advantages (GRPO) as pure, jittable functions.

Each prompt is sampled `group_size` times; an episode's advantage is its reward relative to the
other episodes of the same prompt, so no value model is needed.

Standard deviation: unbiased (ddof=1), as verl/T3RL compute it with `torch.std`. A group of one
episode has no defined unbiased std and no baseline to compare with, so its advantage is 0 (verl
instead passes the raw reward through for singletons; a single sample carries no relative signal).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from t3rl_jax.rl import registry

ADVANTAGE_MODES = registry.names("advantage")


def grpo_estimator(centered: jax.Array, std: jax.Array, eps: float) -> jax.Array:
    return centered / (std + eps)


def mean_only_estimator(centered: jax.Array, std: jax.Array, eps: float) -> jax.Array:
    del std, eps  # Dr. GRPO: no division by the std, which over-weights groups whose rewards barely differ
    return centered


def group_advantages(rewards: jax.Array, *, mode: str = "grpo", eps: float = 1e-6) -> jax.Array:
    """Advantages for rewards laid out [num_groups, group_size].

    `mode` names a registered estimator (`rl.registry`, kind "advantage"): 'grpo': (r - mean_g) /
    (std_g + eps); 'mean_only': r - mean_g.
    """
    estimator = registry.get("advantage", mode)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [num_groups, group_size], got shape {rewards.shape}")
    rewards = rewards.astype(jnp.float32)
    group_size = rewards.shape[1]
    if group_size < 2:
        return jnp.zeros_like(rewards)
    centered = rewards - rewards.mean(axis=1, keepdims=True)
    std = jnp.sqrt(jnp.sum(centered**2, axis=1, keepdims=True) / (group_size - 1))
    return estimator(centered, std, eps)


def group_advantages_flat(
    rewards: jax.Array,
    group_ids: jax.Array,
    num_groups: int,
    *,
    mode: str = "grpo",
    eps: float = 1e-6,
) -> jax.Array:
    """Advantages for flat rewards [N] with integer group ids in [0, num_groups).

    For batches where groups are not contiguous or not all the same size (e.g. after some
    episodes failed). `num_groups` must be static under jit. Groups of one episode get 0.
    """
    estimator = registry.get("advantage", mode)
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be [N]; got {rewards.shape} and {group_ids.shape}"
        )
    rewards = rewards.astype(jnp.float32)
    count = jax.ops.segment_sum(jnp.ones_like(rewards), group_ids, num_segments=num_groups)
    total = jax.ops.segment_sum(rewards, group_ids, num_segments=num_groups)
    mean = total / jnp.maximum(count, 1.0)
    centered = rewards - mean[group_ids]
    has_peers = count[group_ids] >= 2
    sq = jax.ops.segment_sum(centered**2, group_ids, num_segments=num_groups)
    std = jnp.sqrt(sq / jnp.maximum(count - 1.0, 1.0))
    return jnp.where(has_peers, estimator(centered, std[group_ids], eps), 0.0)
