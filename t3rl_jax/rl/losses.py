"""Per-token policy-gradient terms: PPO clipped surrogate, truncated importance sampling, KL.

All functions take per-token log-probs [B, T] (or any matching shapes) and return per-token values
plus masked metrics (`step_metrics.Weighted`: each carries its numerator and denominator, or its extreme, so
micro-batches combine exactly); reduction of the loss to a scalar is `aggregation.aggregate`'s job.

Log-ratios are clamped to [-20, 20] before `exp`, as verl does, so one wild token cannot overflow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from t3rl_jax.rl import registry
from t3rl_jax.rl.step_metrics import Weighted, token_max, token_mean, token_min

LOG_RATIO_CLAMP = 20.0
# k3 can still be huge when the reference gives a token almost no mass; verl clamps it to +-10.
LOW_VAR_KL_CLAMP = 10.0


def _ratio(logp, base_logp):
    log_ratio = jnp.clip(logp.astype(jnp.float32) - base_logp.astype(jnp.float32), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return jnp.exp(log_ratio), log_ratio


def ppo_clip_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float = 0.0,
) -> tuple[jax.Array, dict[str, Weighted]]:
    """Per-token clipped surrogate loss (to minimise) and its metrics.

    loss = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)); `clip_high > clip_low` is DAPO's
    clip-higher (room for low-probability tokens to grow). With `dual_clip = c > 1`, tokens with
    A < 0 are further capped at -A c: a negative advantage on a token whose ratio exploded would
    otherwise give an unbounded loss. `advantages` broadcasts against `logp` (e.g. [B, 1]).
    """
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low and clip_high must be >= 0, got {clip_low}, {clip_high}")
    if dual_clip and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be 0 (off) or > 1, got {dual_clip}")
    advantages = jnp.broadcast_to(advantages.astype(jnp.float32), logp.shape)
    ratio, log_ratio = _ratio(logp, old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = jnp.maximum(unclipped, clipped)
    negative = advantages < 0
    dual_active = jnp.zeros_like(negative)
    if dual_clip:
        cap = -advantages * dual_clip
        dual_active = negative & (loss > cap)
        loss = jnp.where(negative, jnp.minimum(loss, cap), loss)
    # The clipped branch wins exactly when the surrogate is flat in the ratio (zero gradient).
    clip_active = clipped > unclipped
    metrics = {
        "clip_frac_low": token_mean(clip_active & negative, mask),
        "clip_frac_high": token_mean(clip_active & (advantages > 0), mask),
        "clip_frac_dual": token_mean(dual_active, mask),
        # First-order estimate of KL(old || new), verl's ppo_kl.
        "approx_kl": token_mean(-log_ratio, mask),
        "ratio_mean": token_mean(ratio, mask),
        "ratio_max": token_max(ratio, mask),
        "ratio_min": token_min(ratio, mask),
    }
    return loss, metrics


def truncated_is_weights(
    old_logp: jax.Array, rollout_logp: jax.Array, mask: jax.Array, *, cap: float
) -> tuple[jax.Array, dict[str, Weighted]]:
    """Truncated importance-sampling weights min(pi_old / pi_rollout, cap) and mismatch metrics.

    The rollout engine and the trainer compute slightly different log-probs for the same tokens
    (kernels, precision, batching). When the trainer's recomputed log-probs are the PPO anchor, the
    samples still came from the engine's distribution; TIS reweights each token by the (capped)
    ratio to correct that. The weights are constants (no gradient). `cap <= 0` disables the
    correction (weights 1) but still reports the mismatch.
    """
    ratio, log_ratio = _ratio(old_logp, rollout_logp)
    ratio = jax.lax.stop_gradient(ratio)
    if cap > 0:
        weights = jnp.minimum(ratio, cap)
        frac_capped = token_mean(ratio > cap, mask)
    else:
        weights = jnp.ones_like(ratio)
        frac_capped = token_mean(jnp.zeros_like(ratio), mask)
    metrics = {
        "mismatch_abs_logp_diff_mean": token_mean(jnp.abs(log_ratio), mask),
        "mismatch_ratio_max": token_max(ratio, mask),
        "mismatch_ratio_min": token_min(ratio, mask),
        "tis_frac_capped": frac_capped,
    }
    return jax.lax.stop_gradient(weights), metrics


def low_var_kl(logp, ref_logp):
    # k3 estimator of KL(pi || ref): unbiased, always >= 0, lower variance than log(pi / ref).
    log_ratio = jnp.clip(ref_logp - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return jnp.clip(jnp.exp(log_ratio) - log_ratio - 1.0, -LOW_VAR_KL_CLAMP, LOW_VAR_KL_CLAMP)


def k1_kl(logp, ref_logp):
    return logp - ref_logp


def mse_kl(logp, ref_logp):  # k2
    return 0.5 * jnp.square(logp - ref_logp)


def abs_kl(logp, ref_logp):
    return jnp.abs(logp - ref_logp)


KL_TYPES = registry.names("kl")


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, kind: str = "low_var_kl") -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs; `kind` names a registered estimator."""
    return registry.get("kl", kind)(logp.astype(jnp.float32), ref_logp.astype(jnp.float32))
