"""Attention as pure functions.

One masking rule serves every use: a query may see a key iff both belong to the same
non-padding segment and the key's position is not after the query's. Positions and segment
ids travel with the tokens, so the same rule covers packed sequences, left/right padding,
KV-cache decoding (unfilled cache slots carry segment 0) and context parallelism, where
tokens are reordered across devices for causal load balancing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PAD_SEGMENT = 0
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids):
    """Boolean [B, T, S] mask from [B, T] query and [B, S] key positions / segment ids."""
    same_segment = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    not_pad = (q_segment_ids[:, :, None] != PAD_SEGMENT) & (kv_segment_ids[:, None, :] != PAD_SEGMENT)
    causal = kv_positions[:, None, :] <= q_positions[:, :, None]
    return same_segment & not_pad & causal


def dot_product_attention(q, k, v, mask):
    """Grouped-query attention.

    q: [B, T, Hq, D]; k, v: [B, S, Hkv, D] with Hq a multiple of Hkv; mask: [B, T, S] bool.
    Scores and softmax run in float32; rows with no visible key (padding queries) return
    zeros instead of NaN so padded batches keep finite gradients.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads {hq} are not a multiple of kv heads {hkv}")
    group = hq // hkv
    qg = q.reshape(b, t, hkv, group, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5)
    m = mask[:, None, None, :, :]
    scores = jnp.where(m, scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(m, probs, 0.0).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, hq, d)


def single_query_attention(q, k, v, mask):
    """`dot_product_attention` for one query per row (a decode step): q [B, 1, Hq, D], mask [B, 1, S].

    The keys/values are a layer's KV cache. The einsums keep the cache's own [B, S, Hkv, D] layout as the
    contraction operand (the batched form above makes XLA on CPU copy the whole cache slice into a transposed
    layout every step). A multiply-and-reduce form was faster still but computed wrong results on XLA CPU for a
    single row with >= 128 keys (see tests/test_attention.py), so it is not used.
    """
    b, _, hq, d = q.shape
    hkv = k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads {hq} are not a multiple of kv heads {hkv}")
    qg = q.reshape(b, hkv, hq // hkv, d)
    scores = jnp.einsum("bskd,bkgd->bskg", k, qg, preferred_element_type=jnp.float32) * (d ** -0.5)
    m = mask[:, 0, :, None, None]
    scores = jnp.where(m, scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=1)
    probs = jnp.where(m, probs, 0.0).astype(v.dtype)
    out = jnp.einsum("bskg,bskd->bkgd", probs, v, preferred_element_type=jnp.float32)  # [B, Hkv, G, D]
    return out.astype(v.dtype).reshape(b, 1, hq, d)


def attend(q, k, v, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids):
    """Reference attention: the signature every attention implementation in the model shares."""
    mask = attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    if q.shape[1] == 1:
        return single_query_attention(q, k, v, mask)
    return dot_product_attention(q, k, v, mask)
