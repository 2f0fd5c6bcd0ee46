"""The GRPO objective: clipped policy loss + optional KL to a reference - entropy bonus.

    loss = agg(w_tis * policy_loss) + kl_coef * agg(kl(pi || pi_ref)) - entropy_coef * agg(entropy)

Pieces live in `advantages`, `losses`, `aggregation` and `entropy`, chosen by name through `registry`
(policy_loss, kl_type, loss_agg); this module only wires them under one settings object built from the
`algo` config section. `LossSettings` is a frozen
dataclass, so it can be a static argument of a jitted train step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from t3rl_jax.rl import registry
from t3rl_jax.rl.aggregation import aggregate_parts
from t3rl_jax.rl.losses import kl_penalty, truncated_is_weights
from t3rl_jax.rl.step_metrics import Weighted, token_mean


@dataclasses.dataclass(frozen=True)
class LossSettings:
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float | None = 0.0  # 0 or None = off; else the cap c > 1 for negative advantages
    kl_coef: float = 0.0  # 0 = no KL term and no reference forward
    kl_type: str = "low_var_kl"
    entropy_coef: float = 0.0
    loss_agg: str = "token_mean"
    tis_cap: float = 0.0  # 0 = no truncated importance sampling

    policy_loss: str = "ppo_clip"

    def __post_init__(self):
        if self.dual_clip is None:
            object.__setattr__(self, "dual_clip", 0.0)
        for kind, name in (("loss_agg", self.loss_agg), ("kl", self.kl_type), ("policy_loss", self.policy_loss)):
            if name not in registry.names(kind):
                raise ValueError(f"{kind} {name!r} is not one of {registry.names(kind)} "
                                 f"({registry.CONFIG_KEYS[kind]})")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.tis_cap < 0:
            raise ValueError(f"tis_cap must be >= 0, got {self.tis_cap}")

    @property
    def needs_reference(self) -> bool:
        """Whether the caller must run the reference model (skipped entirely when False)."""
        return self.kl_coef > 0

    @classmethod
    def from_algo_config(cls, algo: Any) -> LossSettings:
        """From the `algo` config section (a ConfigDict or anything with those attributes)."""
        return cls(**{f.name: getattr(algo, f.name) for f in dataclasses.fields(cls)})


def grpo_loss(
    settings: LossSettings,
    *,
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    entropy: jax.Array | None = None,
    ref_logp: jax.Array | None = None,
    rollout_logp: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    denominator: jax.Array | float | None = None,
) -> tuple[jax.Array, dict[str, Weighted]]:
    """Scalar loss to minimise and its metrics (`step_metrics.Weighted`), for one (micro-)batch.

    logp: current policy log-probs of the sampled tokens [B, T]; old_logp: the PPO anchor (the
    trainer's recomputed log-probs, or the rollout's own); advantages: [B, T] (or broadcastable);
    mask: 1 on sampled tokens. entropy: per-token entropy [B, T] (required when entropy_coef > 0,
    else optional, for metrics). ref_logp: required iff kl_coef > 0. rollout_logp: the engine's
    log-probs when old_logp came from the trainer; enables TIS (tis_cap > 0) and mismatch metrics.
    segment_ids / denominator: see `aggregation.aggregate`.
    """
    if settings.needs_reference and ref_logp is None:
        raise ValueError(f"kl_coef={settings.kl_coef} > 0 needs ref_logp (the reference model's log-probs)")
    if settings.entropy_coef and entropy is None:
        raise ValueError(f"entropy_coef={settings.entropy_coef} needs the per-token entropy")
    if settings.tis_cap > 0 and rollout_logp is None:
        raise ValueError(f"tis_cap={settings.tis_cap} > 0 needs rollout_logp")

    def parts(values):
        return aggregate_parts(values, mask, settings.loss_agg, segment_ids=segment_ids)

    per_token, metrics = registry.get("policy_loss", settings.policy_loss)(
        logp,
        old_logp,
        advantages,
        mask,
        clip_low=settings.clip_low,
        clip_high=settings.clip_high,
        dual_clip=settings.dual_clip,
    )
    if rollout_logp is not None:
        weights, mismatch = truncated_is_weights(old_logp, rollout_logp, mask, cap=settings.tis_cap)
        metrics.update(mismatch)
        per_token = per_token * weights
    # Every term shares one denominator, so the loss is one numerator over it; the metrics keep the local
    # count as their weight (summed over micro-batches it is the whole batch's denominator).
    pg_num, count = parts(per_token)
    loss_num = pg_num
    metrics["pg_loss"] = Weighted(pg_num, count)
    if settings.needs_reference:
        kl_num, _ = parts(kl_penalty(logp, ref_logp, settings.kl_type))
        loss_num = loss_num + settings.kl_coef * kl_num
        metrics["kl"] = Weighted(kl_num, count)
    if entropy is not None:
        ent_num, _ = parts(entropy)
        if settings.entropy_coef:
            loss_num = loss_num - settings.entropy_coef * ent_num
        metrics["entropy"] = Weighted(ent_num, count)
    metrics["advantage_mean"] = token_mean(jnp.broadcast_to(advantages, logp.shape), mask)
    metrics["loss"] = Weighted(loss_num, count)
    den = count if denominator is None else jnp.asarray(denominator, jnp.float32)
    loss = jnp.where(den > 0, loss_num / jnp.where(den > 0, den, 1.0), 0.0)
    return loss, metrics
