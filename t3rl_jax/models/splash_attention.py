"""Pallas splash attention (TPU) over packed rows: causal mask plus segment ids.

Splash skips the key blocks its static causal mask rules out and masks by segment id inside the rest, so with
packed rows (each segment contiguous, positions increasing along it) it computes what `attention.attend`
computes. Grouped-query attention runs as splash's multi-query kernel per KV head (vmapped over batch and KV
heads). The kernel is built once per (length, heads, block sizes); on a CPU it runs in Pallas interpret mode.

Under context parallelism (`make_context_parallel_attention`) each device's queries (chunks i and 2*CP-1-i of
the load-balanced order) attend to the all-gathered K/V through one kernel whose mask is causal in the
*original* token order, computed from the slot index by arithmetic, and whose mask metadata is split over the
`sequence` axis (splash's `q_seq_shards`), as MaxText does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from t3rl_jax import sharding as sh
from t3rl_jax.models.attention import PAD_SEGMENT

BLOCK = 512


def _block_sizes(block: int):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    return sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                         block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)


@functools.lru_cache(maxsize=None)
def _kernel(t: int, group: int, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(group)])
    return sk.make_splash_mqa(mask, block_sizes=_block_sizes(block), head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def _check_block(t: int, block: int):
    if t % block:
        raise ValueError(f"splash attention needs the sequence length {t} to be a multiple of its block {block}")


def _grouped_call(kernel, q, k, v, q_segment_ids, kv_segment_ids):
    """Run the MQA `kernel` per row and KV head: q [B, Tq, Hq, D], k/v [B, S, Hkv, D] -> [B, Tq, Hq, D]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    b, t, hq, d = q.shape
    hkv = k.shape[2]
    # [B, Hkv, G, T, D] queries (scaled: splash applies no softmax scale), [B, Hkv, S, D] keys and values.
    qg = jnp.transpose(q.reshape(b, t, hkv, hq // hkv, d), (0, 2, 3, 1, 4)) * jnp.asarray(d ** -0.5, q.dtype)
    kt, vt = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))

    def one(qh, kh, vh, qs, ks):
        return kernel(qh, kh, vh, segment_ids=sk.SegmentIds(q=qs, kv=ks))

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))  # over KV heads
    out = jax.vmap(per_head)(qg, kt, vt, q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32))
    out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, hq, d)
    # Padding tokens share segment id 0, so splash lets them see each other; attend gives them zeros.
    return jnp.where((q_segment_ids != PAD_SEGMENT)[:, :, None, None], out, 0).astype(q.dtype)


def attend(q, k, v, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids, block_size: int = BLOCK,
           interpret: bool = False):
    """attend's contract for self-attention over packed rows. q [B, T, Hq, D], k/v [B, T, Hkv, D]; T must be a
    multiple of the block (min(block_size, T))."""
    del q_positions, kv_positions  # splash's causal mask is the token order within each segment
    t, hq, hkv = q.shape[1], q.shape[2], k.shape[2]
    if k.shape[1] != t:
        raise ValueError(f"splash attention is self-attention over packed rows: {t} queries but {k.shape[1]} keys")
    block = min(block_size, t)
    _check_block(t, block)
    return _grouped_call(_kernel(t, hq // hkv, block, interpret), q, k, v, q_segment_ids, kv_segment_ids)


def original_index(slot, chunk: int, cp: int):
    """Original token index of load-balanced slot `slot` (numpy or jax integers; arithmetic only, so it also
    runs inside the kernel): slot chunk 2p holds chunk p, slot chunk 2p+1 holds chunk 2*CP-1-p."""
    c = slot // chunk
    pair, half = c // 2, c % 2
    return (pair + half * (2 * cp - 1 - 2 * pair)) * chunk + slot % chunk


def _load_balanced_causal_mask(t: int, cp: int):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    chunk = t // (2 * cp)

    class LoadBalancedCausalMask(sm._ComputableMask):
        """Key visible iff it is not after the query in the original order (tokens in CP order)."""

        def __init__(self):
            super().__init__((t, t), lambda q, kv: original_index(kv, chunk, cp) <= original_index(q, chunk, cp),
                             shard_count=cp)

        def __eq__(self, other):
            return isinstance(other, type(self)) and self.shape == other.shape

        def __hash__(self):
            return hash((type(self), self.shape, cp))

    return LoadBalancedCausalMask()


def make_context_parallel_attention(mesh, rules=sh.LOGICAL_AXIS_RULES, *, block_size: int = BLOCK,
                                    interpret: bool = False):
    """attend's signature for CP-ordered packed rows with `length` on the mesh's `sequence` axis."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    q_spec = sh.logical_to_spec(("batch", "length", "heads", "head_dim"), rules, mesh=mesh)
    kv_spec = sh.logical_to_spec(("batch", "length", "kv_heads", "head_dim"), rules, mesh=mesh)
    tok_spec = jax.sharding.PartitionSpec(*q_spec[:2])
    axis = q_spec[1]
    if axis is None or isinstance(axis, tuple):
        raise ValueError(f"splash context parallelism needs `length` on one mesh axis, rules give {axis}")
    cp = mesh.shape[axis]
    gather = lambda x: jax.lax.all_gather(x, axis, axis=1, tiled=True)

    def attend_cp(q, k, v, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids):
        del q_positions, kv_positions  # the mask is the load-balanced causal order; segments come from the ids
        t, hq, hkv = q.shape[1], q.shape[2], k.shape[2]
        sh.validate(mesh, seq_len=t, num_heads=hq, num_kv_heads=hkv, batch_size=q.shape[0], rules=rules)
        block = min(block_size, t // cp)
        _check_block(t // cp, block)
        mask = sm.MultiHeadMask([_load_balanced_causal_mask(t, cp) for _ in range(hq // hkv)])
        kernel = sk.make_splash_mqa(mask, block_sizes=_block_sizes(block), head_shards=1, q_seq_shards=cp,
                                    interpret=interpret)
        kernel_spec = kernel.manual_sharding_spec(jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
            None, axis)))

        def local(q, k, v, q_seg, kv_seg, kernel):
            return _grouped_call(kernel, q, gather(k), gather(v), q_seg, gather(kv_seg))

        sharded = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, tok_spec, tok_spec,
                                                            kernel_spec), out_specs=q_spec, check_vma=False)
        return sharded(q, k, v, q_segment_ids, kv_segment_ids, kernel)

    return attend_cp
