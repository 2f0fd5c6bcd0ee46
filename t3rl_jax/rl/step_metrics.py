"""Training metrics that carry their own reducer, so micro- and mini-batch results combine into the step's value.

A metric computed on one micro-batch is a `Weighted(total, weight, reduce)`:
- "mean": `total` is a numerator (e.g. masked token count of clipped tokens) and `weight` its denominator (the
  masked tokens); parts combine by adding both, so the step value is the token- (or sequence-) weighted mean over
  the whole batch, whatever the number of micro-batches;
- "max" / "min": `total` is the part's extreme; parts with weight 0 (no masked token) take no part;
- "sum": `total` adds up (counts).
Averaging per-micro-batch values instead (as the step did) reads partial sums as 1/M of the truth and turns maxima
into means.

`Weighted` is a pytree (its reducer static), so jitted functions return it; on the host `float(w)` / `np.asarray(w)`
give its value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

REDUCERS = ("mean", "max", "min", "sum")


@dataclasses.dataclass(frozen=True)
class Weighted:
    total: Any
    weight: Any
    reduce: str = "mean"

    def __post_init__(self):
        if self.reduce not in REDUCERS:
            raise ValueError(f"metric reducer {self.reduce!r} is not one of {REDUCERS}")

    @property
    def value(self):
        total, weight = np.asarray(self.total, np.float64), np.asarray(self.weight, np.float64)
        if self.reduce == "mean":
            return np.where(weight > 0, total / np.where(weight > 0, weight, 1.0), 0.0)
        if self.reduce in ("max", "min"):
            return np.where(weight > 0, total, 0.0)
        return total

    def __float__(self) -> float:
        return float(self.value)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.value, dtype=dtype)


jax.tree_util.register_dataclass(Weighted, data_fields=("total", "weight"), meta_fields=("reduce",))


def token_mean(values, mask) -> Weighted:
    """Masked mean of per-token `values` as numerator / masked-token count (jittable)."""
    mask = jnp.broadcast_to(mask.astype(jnp.float32), jnp.shape(values))
    return Weighted(jnp.sum(jnp.asarray(values, jnp.float32) * mask), jnp.sum(mask), "mean")


def token_max(values, mask) -> Weighted:
    mask = jnp.broadcast_to(mask, jnp.shape(values)).astype(bool)
    return Weighted(jnp.max(jnp.where(mask, jnp.asarray(values, jnp.float32), -jnp.inf)),
                    jnp.sum(mask).astype(jnp.float32), "max")


def token_min(values, mask) -> Weighted:
    mask = jnp.broadcast_to(mask, jnp.shape(values)).astype(bool)
    return Weighted(jnp.min(jnp.where(mask, jnp.asarray(values, jnp.float32), jnp.inf)),
                    jnp.sum(mask).astype(jnp.float32), "min")


def combine(parts: Sequence[Mapping[str, Weighted]]) -> dict[str, Weighted]:
    """One Weighted per name from the parts' (host) metrics; every part must have the same names and reducers."""
    if not parts:
        return {}
    names = list(parts[0])
    out = {}
    for name in names:
        ws = [p[name] for p in parts]
        kinds = {w.reduce for w in ws}
        if len(kinds) != 1:
            raise ValueError(f"metric {name!r} has different reducers across parts: {sorted(kinds)}")
        kind = kinds.pop()
        totals = np.asarray([np.asarray(w.total, np.float64) for w in ws])
        weights = np.asarray([np.asarray(w.weight, np.float64) for w in ws])
        if kind in ("mean", "sum"):
            total = totals.sum()
        else:
            live = weights > 0
            if not live.any():
                total = 0.0
            else:
                total = totals[live].max() if kind == "max" else totals[live].min()
        out[name] = Weighted(float(total), float(weights.sum()), kind)
    return out


def values(metrics: Mapping[str, Weighted]) -> dict[str, float]:
    return {name: float(w) for name, w in metrics.items()}
