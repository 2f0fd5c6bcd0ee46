"""Names of the GRPO building blocks -> their implementations: the one list the config's allowed values come from.

Kinds and the call each implementation answers:
- "advantage": (centered [G, N] or [N], std of the same shape, eps) -> advantages (`rl.advantages`);
- "policy_loss": (logp, old_logp, advantages, mask, *, clip_low, clip_high, dual_clip) -> (per-token loss,
  metrics) (`rl.losses`);
- "kl": (logp, ref_logp) -> per-token KL(pi || ref) estimate (`rl.losses`);
- "loss_agg": (values, mask, segment_ids) -> (numerator, local denominator) (`rl.aggregation`).

Implementations are named by import path and imported on first use, so this module (and config validation,
which reads `names`) imports no JAX. Adding a block = writing its function and one line here.
"""

from __future__ import annotations

import importlib

_IMPLEMENTATIONS: dict[str, dict[str, str]] = {
    "advantage": {
        "grpo": "t3rl_jax.rl.advantages:grpo_estimator",  # (r - mean) / (unbiased std + eps)
        "mean_only": "t3rl_jax.rl.advantages:mean_only_estimator",  # Dr. GRPO: r - mean
    },
    "policy_loss": {
        "ppo_clip": "t3rl_jax.rl.losses:ppo_clip_loss",  # clipped surrogate, clip-higher, optional dual clip
    },
    "kl": {
        "low_var_kl": "t3rl_jax.rl.losses:low_var_kl",  # k3
        "kl": "t3rl_jax.rl.losses:k1_kl",  # k1
        "mse": "t3rl_jax.rl.losses:mse_kl",  # k2
        "abs": "t3rl_jax.rl.losses:abs_kl",
    },
    "loss_agg": {
        "token_mean": "t3rl_jax.rl.aggregation:token_mean_parts",  # every token weighs the same
        "seq_mean_token_mean": "t3rl_jax.rl.aggregation:seq_mean_token_mean_parts",  # every episode weighs the same
    },
}
KINDS = tuple(_IMPLEMENTATIONS)
CONFIG_KEYS = {"advantage": "algo.advantage", "policy_loss": "algo.policy_loss", "kl": "algo.kl_type",
               "loss_agg": "algo.loss_agg"}
_cache: dict[tuple[str, str], object] = {}


def names(kind: str) -> tuple[str, ...]:
    """The registered names of `kind`, in registration order."""
    if kind not in _IMPLEMENTATIONS:
        raise KeyError(f"unknown registry kind {kind!r}; expected one of {KINDS}")
    return tuple(_IMPLEMENTATIONS[kind])


def get(kind: str, name: str):
    """The implementation registered as `name` under `kind`; an unknown name is an error listing the choices."""
    choices = names(kind)
    if name not in choices:
        raise ValueError(f"{CONFIG_KEYS[kind]} {name!r} is not registered; expected one of {choices}")
    key = (kind, name)
    if key not in _cache:
        module, attr = _IMPLEMENTATIONS[kind][name].split(":")
        _cache[key] = getattr(importlib.import_module(module), attr)
    return _cache[key]
