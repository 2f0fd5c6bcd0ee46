"""Context parallelism: attention over a sequence sharded on the `sequence` mesh axis.

Each device holds T/CP query tokens and the K/V of the same tokens. Two ways to let every query
see every key it needs, both exact and both built on the blockwise (online-softmax) kernel:

- `all_gather`: gather K/V (and their positions / segment ids) along the sequence, attend
  locally; the backward re-gathers and reduce-scatters dK/dV, so only local K/V are kept for it.
  With GQA (Qwen3-4B: 8 KV heads vs 32 query heads) the gathered K/V are small next to Q.
- `ring`: pass K/V blocks around the ring with `ppermute`, merging per-block softmax statistics;
  dK/dV travel with their block in the backward and arrive home after CP hops.

The mask depends only on positions and segment ids, so tokens may sit on devices in any order.
Causal load balancing uses that: each sequence is cut into 2*CP chunks and device i holds chunks
i and 2*CP-1-i, giving every device the same number of visible (query, key) pairs. The kernel's tile schedule
is static per device (and per ring hop), built from the original token indices of its chunks; the device picks
its row by `axis_index`, so no step branches on the data.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from t3rl_jax import sharding as sh
from t3rl_jax.models import attention, chunked_attention as ca

STRATEGIES = ("all_gather", "ring")
LOCAL_KERNELS = ("blockwise", "cudnn", "xla")


# ----------------------------------------------------------------------------- load balancing


def load_balance_order(seq_len: int, cp: int) -> np.ndarray:
    """Token order for CP: slot j of the reordered sequence holds original token order[j]."""
    if cp < 1:
        raise ValueError(f"context parallelism must be >= 1, got {cp}")
    if cp == 1:
        return np.arange(seq_len)
    if seq_len % (2 * cp):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2*context parallelism = {2 * cp}")
    chunks = np.arange(seq_len).reshape(2 * cp, seq_len // (2 * cp))
    pairs = [np.concatenate([chunks[i], chunks[2 * cp - 1 - i]]) for i in range(cp)]
    return np.concatenate(pairs)


def to_load_balanced(x, cp: int, axis: int = 1):
    """Permute tokens (ids, positions, segment ids, labels, masks, ...) into the CP order."""
    return x.take(load_balance_order(x.shape[axis], cp), axis=axis)


def from_load_balanced(x, cp: int, axis: int = 1):
    """Inverse of `to_load_balanced` (e.g. for per-token log-probs or logits)."""
    return x.take(np.argsort(load_balance_order(x.shape[axis], cp)), axis=axis)


def load_balance_batch(batch: Any, cp: int) -> Any:
    """Reorder every [B, T, ...] leaf of a batch; [B] leaves (per-sequence values) stay as they are.

    Next-token labels must be built before reordering: the order breaks adjacency.
    """
    return jax.tree.map(lambda x: to_load_balanced(x, cp) if np.ndim(x) >= 2 else x, batch)


def visible_pairs_per_shard(positions, segment_ids, cp: int) -> np.ndarray:
    """[B, CP] count of visible (query, key) pairs for the queries each sequence shard holds."""
    positions, segment_ids = np.asarray(positions), np.asarray(segment_ids)
    b, t = positions.shape
    if t % cp:
        raise ValueError(f"sequence length {t} is not divisible by context parallelism {cp}")
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    real = (segment_ids != 0)[:, :, None] & (segment_ids != 0)[:, None, :]
    causal = positions[:, None, :] <= positions[:, :, None]
    per_query = (same & real & causal).sum(axis=2)
    return per_query.reshape(b, cp, t // cp).sum(axis=2)


# ----------------------------------------------------------------------------- local kernels


def _with_vjp(forward, backward):
    """Attention with a hand-written backward: `forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg) -> (out, lse)` in
    grouped layout; `backward(residuals, dout)` gets (q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse)."""

    @jax.custom_vjp
    def attend_local(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
        return ca.ungroup_output(forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg)[0], q.dtype)

    def fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
        out, lse = forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg)
        return ca.ungroup_output(out, q.dtype), (q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse)

    attend_local.defvjp(fwd, backward)
    return attend_local


def _device_schedules(q_len: int, kv_len: int, cp: int, q_block: int, kv_block: int, *, ring: bool) -> np.ndarray:
    """Static tile schedules for the load-balanced order, one per device ([CP, P, 3]) or, for the ring, per
    device and hop ([CP, CP, P, 3]: at hop h a device holds the K/V block of device d - h). Each is causal in the
    original token order, so every device skips the tiles it can never see; padded to one length."""
    order = load_balance_order(q_len * cp, cp)
    local = lambda d: order[d * q_len:(d + 1) * q_len]
    if not ring:
        return ca.stack_schedules([ca.tile_schedule(local(d), order, q_block, kv_block) for d in range(cp)])
    flat = ca.stack_schedules([ca.tile_schedule(local(d), local((d - h) % cp), q_block, kv_block)
                               for d in range(cp) for h in range(cp)])
    return flat.reshape(cp, cp, *flat.shape[1:])


def _gathered_attention(axis: str, cp: int, block_size: int):
    """Per-device attention with K/V all-gathered over `axis` (runs inside shard_map)."""
    gather = lambda x: jax.lax.all_gather(x, axis, axis=1, tiled=True)

    def schedule(q):
        t = q.shape[1]
        table = _device_schedules(t, t, cp, min(block_size, t), block_size, ring=False)
        return jax.numpy.asarray(table)[jax.lax.axis_index(axis)]

    def forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
        return ca.blockwise_forward(q, gather(k), gather(v), q_pos, gather(kv_pos), q_seg, gather(kv_seg), block_size,
                                    schedule=schedule(q))

    def bwd(residuals, dout):
        q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse = residuals
        dout_g = ca.group_cotangent(dout, k.shape[2])
        dq, dk, dv = ca.blockwise_backward(q, gather(k), gather(v), q_pos, gather(kv_pos), q_seg, gather(kv_seg),
                                           lse, ca.output_delta(out, dout_g), dout_g, block_size,
                                           schedule=schedule(q))
        scatter = lambda g: jax.lax.psum_scatter(g, axis, scatter_dimension=1, tiled=True)
        return dq.astype(q.dtype), scatter(dk).astype(k.dtype), scatter(dv).astype(v.dtype), None, None, None, None

    return _with_vjp(forward, bwd)


def _ring_attention(axis: str, cp: int, block_size: int):
    """Per-device attention with K/V blocks passed around a ring over `axis` (runs inside shard_map)."""
    shift = [(i, (i + 1) % cp) for i in range(cp)]
    rotate = lambda *xs: tuple(jax.lax.ppermute(x, axis, shift) for x in xs)

    def schedules(q):
        t = q.shape[1]
        table = _device_schedules(t, t, cp, min(block_size, t), block_size, ring=True)
        return jax.numpy.asarray(table)[jax.lax.axis_index(axis)]  # [CP hops, P, 3]

    def forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
        per_hop = schedules(q)

        def hop(carry, sched):
            out, lse, k, v, kv_pos, kv_seg = carry
            out_i, lse_i = ca.blockwise_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_size, schedule=sched)
            out, lse = ca.merge_stats(out, lse, out_i, lse_i)
            return (out, lse, *rotate(k, v, kv_pos, kv_seg)), None

        out0, lse0 = ca.blockwise_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_size, schedule=per_hop[0])
        carry = (out0, lse0, *rotate(k, v, kv_pos, kv_seg))
        (out, lse, *_), _ = jax.lax.scan(hop, carry, per_hop[1:])
        return out, lse

    def bwd(residuals, dout):
        q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse = residuals
        dout_g = ca.group_cotangent(dout, k.shape[2])
        delta = ca.output_delta(out, dout_g)

        def hop(carry, sched):
            dq, k_, v_, pos_, seg_, dk, dv = carry
            dq_i, dk_i, dv_i = ca.blockwise_backward(q, k_, v_, q_pos, pos_, q_seg, seg_, lse, delta, dout_g,
                                                     block_size, schedule=sched)
            # dK/dV ride with their block; after CP hops both are back on the block's home device.
            return (dq + dq_i, *rotate(k_, v_, pos_, seg_, dk + dk_i, dv + dv_i)), None

        zeros = jax.numpy.zeros(k.shape, jax.numpy.float32)
        init = (jax.numpy.zeros(q.shape, jax.numpy.float32), k, v, kv_pos, kv_seg, zeros, zeros)
        (dq, *_, dk, dv), _ = jax.lax.scan(hop, init, schedules(q))
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None

    return _with_vjp(forward, bwd)


def _gathered_masked_attention(axis: str, implementation: str):
    """Per-device attention with K/V all-gathered over `axis` through `jax.nn.dot_product_attention` with an
    explicit [B, 1, T/CP, T] mask from positions and segment ids (runs inside shard_map). With
    implementation="cudnn" that is cuDNN's fused kernel with the mask as a bias: exact for any token order, at the
    cost of the mask in memory and of the tiles a causal kernel would skip."""
    gather = lambda x: jax.lax.all_gather(x, axis, axis=1, tiled=True)

    def attend_local(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
        kv_pos, kv_seg = gather(kv_pos), gather(kv_seg)
        mask = attention.attention_mask(q_pos, kv_pos, q_seg, kv_seg)[:, None]
        out = jax.nn.dot_product_attention(q, gather(k), gather(v), mask=mask, implementation=implementation)
        # Rows that see nothing (padding) come out as a uniform average; attend gives them zeros.
        return jax.numpy.where(mask.any(axis=-1)[:, 0, :, None, None], out, 0).astype(q.dtype)

    return attend_local


# ----------------------------------------------------------------------------- factory


def make_context_parallel_attention(mesh: Mesh, rules=sh.LOGICAL_AXIS_RULES, *, strategy: str = "all_gather",
                                    block_size: int = 512, local_kernel: str = "blockwise"):
    """An attention function with `attention.attend`'s signature for activations laid out by `rules`.

    Queries, keys and values are sharded [batch, length, (kv_)heads, head_dim]; with a `sequence`
    axis of size 1 this is just the blockwise kernel under batch / tensor sharding.
    `local_kernel`: "blockwise" (either strategy), or "cudnn" / "xla" (all-gather only): each device's queries
    against the gathered K/V through `jax.nn.dot_product_attention` with an explicit mask.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown context-parallel strategy {strategy!r}; expected one of {STRATEGIES}")
    if local_kernel not in LOCAL_KERNELS:
        raise ValueError(f"unknown context-parallel local kernel {local_kernel!r}; expected one of {LOCAL_KERNELS}")
    if local_kernel != "blockwise" and strategy != "all_gather":
        raise ValueError(f"local kernel {local_kernel!r} runs with strategy 'all_gather' only, got {strategy!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    q_spec = sh.logical_to_spec(("batch", "length", "heads", "head_dim"), rules, mesh=mesh)
    kv_spec = sh.logical_to_spec(("batch", "length", "kv_heads", "head_dim"), rules, mesh=mesh)
    tok_spec = PartitionSpec(*q_spec[:2])
    seq_axes = q_spec[1]
    if isinstance(seq_axes, tuple):
        raise ValueError(f"context parallelism needs `length` on one mesh axis, rules give {seq_axes}")
    cp = 1 if seq_axes is None else mesh.shape[seq_axes]

    def local(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
        bs = min(block_size, k.shape[1] * cp)
        if cp == 1:
            return ca.flash_attention(q, k, v, q_positions=q_pos, kv_positions=kv_pos, q_segment_ids=q_seg,
                                      kv_segment_ids=kv_seg, block_size=bs)
        if local_kernel != "blockwise":
            return _gathered_masked_attention(seq_axes, local_kernel)(q, k, v, q_pos, kv_pos, q_seg, kv_seg)
        if strategy == "ring":
            return _ring_attention(seq_axes, cp, min(bs, k.shape[1]))(q, k, v, q_pos, kv_pos, q_seg, kv_seg)
        return _gathered_attention(seq_axes, cp, bs)(q, k, v, q_pos, kv_pos, q_seg, kv_seg)

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec) + (tok_spec,) * 4,
                            out_specs=q_spec, check_vma=False)

    def attend(q, k, v, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids):
        ca.check_shapes(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
        if q.shape[1] != k.shape[1]:
            raise ValueError(f"context-parallel attention needs as many queries as keys (self-attention over the "
                             f"packed sequence), got {q.shape[1]} queries and {k.shape[1]} keys")
        sh.validate(mesh, seq_len=q.shape[1], num_heads=q.shape[2], num_kv_heads=k.shape[2],
                    batch_size=q.shape[0], rules=rules)
        return sharded(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids)

    return attend
