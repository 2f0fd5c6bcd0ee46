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


CACHE_QUERY_BLOCK = 512


def cache_attention(q, k_cache, v_cache, mask, *, query_block: int = CACHE_QUERY_BLOCK):
    """Grouped-query attention of new tokens over a layer's KV cache (prefill chunks and decode steps).

    q: [B, T, Hq, D]; k_cache: [B, Hkv, D, S]; v_cache: [B, Hkv, S, D] (the cache's own layouts); mask: [B, T, S].
    Both products are batched matmuls over (b, kv_head) with the cache as the plain operand in its stored layout,
    so no step copies or transposes the cache; the queries of a group share one matmul. Long prefill chunks go
    `query_block` queries at a time: their f32 scores against a long cache would otherwise take
    T x S x Hq x 4 bytes (8k x 32k x 32 heads: 32 GiB).
    """
    b, t, hq, d = q.shape
    if k_cache.shape[2] != d or v_cache.shape[3] != d:
        raise ValueError(f"cache_attention: k_cache {k_cache.shape} / v_cache {v_cache.shape} do not match "
                         f"head_dim {d}")
    if hq % k_cache.shape[1]:
        raise ValueError(f"query heads {hq} are not a multiple of kv heads {k_cache.shape[1]}")
    if t <= query_block:
        return _cache_attention_block(q, k_cache, v_cache, mask)
    blocks = -(-t // query_block)
    pad = blocks * query_block - t
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (0, pad), (0, 0)))  # padded queries see nothing and return zeros

    def split(x):
        return jnp.moveaxis(x.reshape(b, blocks, query_block, *x.shape[2:]), 1, 0)

    out = jax.lax.map(lambda qm: _cache_attention_block(qm[0], k_cache, v_cache, qm[1]), (split(q), split(mask)))
    return jnp.moveaxis(out, 0, 1).reshape(b, blocks * query_block, hq, d)[:, :t]


def _cache_attention_block(q, k_cache, v_cache, mask):
    b, t, hq, d = q.shape
    hkv = k_cache.shape[1]
    g = hq // hkv
    qg = q.reshape(b, t, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * t, d)
    scores = jnp.einsum("bkmd,bkds->bkms", qg, k_cache, preferred_element_type=jnp.float32) * (d ** -0.5)
    m = jnp.broadcast_to(mask[:, None, None], (b, 1, g, t, mask.shape[-1])).reshape(b, 1, g * t, -1)
    scores = jnp.where(m, scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(m, probs, 0.0).astype(v_cache.dtype)
    out = jnp.einsum("bkms,bksd->bkmd", probs, v_cache, preferred_element_type=jnp.float32)
    return out.astype(v_cache.dtype).reshape(b, hkv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d)


def attend(q, k, v, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids):
    """Reference attention: the signature every attention implementation in the model shares."""
    mask = attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    return dot_product_attention(q, k, v, mask)
