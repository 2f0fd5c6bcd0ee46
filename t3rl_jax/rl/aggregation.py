"""Masked reductions of per-token values to one scalar loss.

Masks are everywhere: padding, prompt and observation tokens carry mask 0 and contribute nothing.
An all-zero mask yields 0, never NaN (a micro-batch of pure padding must not poison the step).

Gradient accumulation: a step's loss is defined over the whole batch, but it is computed one
micro-batch at a time. Pass the whole batch's `aggregation_denominator` as `denominator` to each
micro-batch's `aggregate`; the micro-batch results then sum to exactly the whole-batch value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from t3rl_jax.rl import registry

LOSS_AGG_MODES = registry.names("loss_agg")


def _effective_mask(mask: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    mask = mask.astype(jnp.float32)
    if segment_ids is None:
        return mask
    if segment_ids.shape != mask.shape:
        raise ValueError(f"segment_ids shape {segment_ids.shape} does not match mask shape {mask.shape}")
    # Segment 0 is padding by convention (see models/attention.py), whatever the mask says.
    return mask * (segment_ids != 0)


def _sequence_sums(values, mask, segment_ids):
    """Per-sequence (sum of masked values, token count), flattened.

    Without segment ids a sequence is a row [B, T]; with them, each (row, segment) pair of a packed
    row is its own sequence. Segment ids are < T+1, so row * (T+1) + segment is a unique id and the
    number of slots is static (no extra "max segments" argument under jit).
    """
    if values.ndim != 2:
        raise ValueError(f"seq_mean_token_mean needs [batch, time] values, got shape {values.shape}")
    if segment_ids is None:
        return jnp.sum(values * mask, axis=-1), jnp.sum(mask, axis=-1)
    b, t = values.shape
    ids = (jnp.arange(b)[:, None] * (t + 1) + segment_ids).reshape(-1)
    sums = jax.ops.segment_sum((values * mask).reshape(-1), ids, num_segments=b * (t + 1))
    counts = jax.ops.segment_sum(mask.reshape(-1), ids, num_segments=b * (t + 1))
    return sums, counts


def _safe_divide(numerator, denominator):
    # The double where keeps gradients finite when the denominator is 0.
    positive = denominator > 0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)


def aggregation_denominator(
    mask: jax.Array, mode: str = "token_mean", *, segment_ids: jax.Array | None = None
) -> jax.Array:
    """What `aggregate` divides by: the number of masked tokens ('token_mean') or the number of
    sequences with at least one masked token ('seq_mean_token_mean')."""
    return aggregate_parts(jnp.zeros(mask.shape, jnp.float32), mask, mode, segment_ids=segment_ids)[1]


def aggregate(
    values: jax.Array,
    mask: jax.Array,
    mode: str = "token_mean",
    *,
    segment_ids: jax.Array | None = None,
    denominator: jax.Array | float | None = None,
) -> jax.Array:
    """Scalar from per-token values [B, T] under a {0,1} mask [B, T].

    'token_mean': sum over all masked tokens / number of masked tokens (every token of the batch
    weighs the same; long episodes weigh more). 'seq_mean_token_mean': mean over sequences of each
    sequence's token mean (every episode weighs the same). `segment_ids` splits packed rows into
    episodes and forces segment-0 tokens out. `denominator` replaces the local count (see module
    docstring).
    """
    numerator, local = aggregate_parts(values, mask, mode, segment_ids=segment_ids)
    den = local if denominator is None else jnp.asarray(denominator, jnp.float32)
    return _safe_divide(numerator, den)


def aggregate_parts(
    values: jax.Array, mask: jax.Array, mode: str = "token_mean", *, segment_ids: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """`aggregate`'s (numerator, local denominator): summed over micro-batches, both give the whole batch's."""
    parts_fn = registry.get("loss_agg", mode)
    if values.shape != mask.shape:
        raise ValueError(f"values shape {values.shape} does not match mask shape {mask.shape}")
    mask = _effective_mask(mask, segment_ids)
    return parts_fn(values.astype(jnp.float32), mask, segment_ids)


def token_mean_parts(values, mask, segment_ids):
    """Sum over all masked tokens, and their count: every token of the batch weighs the same."""
    del segment_ids
    return jnp.sum(values * mask), jnp.sum(mask)


def seq_mean_token_mean_parts(values, mask, segment_ids):
    """Sum over sequences of each sequence's token mean, and the number of sequences with a masked token."""
    sums, counts = _sequence_sums(values, mask, segment_ids)
    return jnp.sum(_safe_divide(sums, counts)), jnp.sum(counts > 0).astype(jnp.float32)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Token mean of `values` over `mask` (0 when the mask is empty); for metrics."""
    mask = jnp.broadcast_to(mask.astype(jnp.float32), values.shape)
    return _safe_divide(jnp.sum(values.astype(jnp.float32) * mask), jnp.sum(mask))


def masked_max(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Max of `values` over `mask` (0 when the mask is empty); for metrics."""
    mask = jnp.broadcast_to(mask, values.shape).astype(bool)
    values = values.astype(jnp.float32)
    return jnp.where(jnp.any(mask), jnp.max(jnp.where(mask, values, -jnp.inf)), 0.0)


def masked_min(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Min of `values` over `mask` (0 when the mask is empty); for metrics."""
    return -masked_max(-values, mask)
