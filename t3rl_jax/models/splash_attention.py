"""Pallas splash attention (TPU) over packed rows: causal mask plus segment ids.

Splash skips the key blocks its static causal mask rules out and masks by segment id inside the rest, so with
packed rows (each segment contiguous, positions increasing along it) it computes what `attention.attend`
computes. Grouped-query attention runs as splash's multi-query kernel per KV head (vmapped over batch and KV
heads). The kernel is built once per (length, heads, block sizes); on a CPU it runs in Pallas interpret mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from t3rl_jax.models.attention import PAD_SEGMENT

BLOCK = 512


@functools.lru_cache(maxsize=None)
def _kernel(t: int, group: int, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(group)])
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return sk.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def attend(q, k, v, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids, block_size: int = BLOCK,
           interpret: bool = False):
    """attend's contract for self-attention over packed rows. q [B, T, Hq, D], k/v [B, T, Hkv, D]; T must be a
    multiple of the block (min(block_size, T))."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    del q_positions, kv_positions  # splash's causal mask is the token order within each segment
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    if k.shape[1] != t:
        raise ValueError(f"splash attention is self-attention over packed rows: {t} queries but {k.shape[1]} keys")
    block = min(block_size, t)
    if t % block:
        raise ValueError(f"splash attention needs the sequence length {t} to be a multiple of its block {block}")
    kernel = _kernel(t, hq // hkv, block, interpret)
    # [B, Hkv, G, T, D] queries (scaled: splash applies no softmax scale), [B, Hkv, T, D] keys and values.
    qg = jnp.transpose(q.reshape(b, t, hkv, hq // hkv, d), (0, 2, 3, 1, 4)) * jnp.asarray(d ** -0.5, q.dtype)
    kt, vt = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))
    q_seg, kv_seg = q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32)

    def one(qh, kh, vh, qs, ks):
        return kernel(qh, kh, vh, segment_ids=sk.SegmentIds(q=qs, kv=ks))

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))  # over KV heads
    out = jax.vmap(per_head)(qg, kt, vt, q_seg, kv_seg)  # over rows: [B, Hkv, G, T, D]
    out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, hq, d)
    # Padding tokens share segment id 0, so splash lets them see each other; attend gives them zeros.
    return jnp.where((q_segment_ids != PAD_SEGMENT)[:, :, None, None], out, 0).astype(q.dtype)
