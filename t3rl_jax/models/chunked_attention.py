"""Exact attention over (query block, key block) tiles (online softmax) with a hand-written backward.

`attend` materialises a [B, H, T, S] score tensor; at 32k tokens that is terabytes. Here tiles of
`q_block_size` queries x `block_size` keys are visited one at a time, so only one tile's scores exist, and the
backward recomputes tile scores from the saved log-sum-exp instead of storing them (autodiff through the tile
loop would save every tile's scores and bring the full matrix back).

Which tiles are visited is a static schedule (`tile_schedule`), not a per-tile branch: one `lax.scan` runs over a
list of (query block, key block) pairs. A branch on the mask (`lax.cond`) inside the loop becomes, on a GPU, a
device-to-host copy of its predicate per tile (and an all-reduce of it under sharding); a fixed list costs
nothing at run time. The causal schedule leaves out tiles whose keys all come after their queries in token
order, which halves the work; it is exact for packed rows (each segment contiguous, its positions increasing
with the token index: what `rl/batching.py` builds) and, with the original token indices passed in, for the
load-balanced order of context parallelism, where every device gets the same number of tiles. The `full`
schedule visits every tile and is exact for any positions. Inside a visited tile the mask still comes from
positions and segment ids.

The forward/backward halves are public so context parallelism can run them on key/value blocks
that arrive from other devices and merge the per-block statistics.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from t3rl_jax.models.attention import PAD_SEGMENT, _MASK_VALUE

# Log-sum-exp of a query row that sees no key: merging with it leaves other blocks' results intact.
EMPTY_LSE = _MASK_VALUE


def check_shapes(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids):
    """Raises a ValueError naming the mismatching argument."""
    b, t, hq, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"keys {k.shape} and values {v.shape} differ in shape")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"keys {k.shape} do not match queries {q.shape} in batch or head_dim")
    if hq % k.shape[2]:
        raise ValueError(f"query heads {hq} are not a multiple of kv heads {k.shape[2]}")
    for name, arr, want in (("q_positions", q_positions, (b, t)), ("q_segment_ids", q_segment_ids, (b, t)),
                            ("kv_positions", kv_positions, (b, k.shape[1])),
                            ("kv_segment_ids", kv_segment_ids, (b, k.shape[1]))):
        if tuple(arr.shape) != want:
            raise ValueError(f"{name} has shape {tuple(arr.shape)}, expected {want}")


# ----------------------------------------------------------------------------- tile schedules


def tile_schedule(q_index, kv_index, q_block: int, kv_block: int, *, causal: bool = True) -> np.ndarray:
    """Static [P, 3] int32 table of (query block, key block, 1) for the tiles the kernel visits.

    q_index [T] / kv_index [S]: each token's index in its packed row (the original order, before any
    context-parallel reordering). With `causal`, a tile is left out when its first key comes after its last
    query in that order: in a packed row such keys are never visible. Rows are sorted by query block.
    """
    q_index, kv_index = np.asarray(q_index), np.asarray(kv_index)
    nq, nk = -(-len(q_index) // q_block), -(-len(kv_index) // kv_block)
    q_last = np.array([q_index[i * q_block:(i + 1) * q_block].max() for i in range(nq)])
    kv_first = np.array([kv_index[j * kv_block:(j + 1) * kv_block].min() for j in range(nk)])
    visit = kv_first[None, :] <= q_last[:, None] if causal else np.ones((nq, nk), bool)
    qi, kj = np.nonzero(visit)
    return np.stack([qi, kj, np.ones_like(qi)], axis=1).astype(np.int32)


def stack_schedules(schedules) -> np.ndarray:
    """Schedules of different lengths (one per device, or per device and ring hop) as one [N, P, 3] table;
    short ones are padded with rows whose third column is 0, which the kernel masks out entirely."""
    schedules = [np.asarray(s, np.int32) for s in schedules]
    length = max(len(s) for s in schedules)
    pad = lambda s: np.concatenate([s, np.zeros((length - len(s), 3), np.int32)]) if len(s) < length else s
    return np.stack([pad(s) for s in schedules])


# ----------------------------------------------------------------------------- tiles


def _tie_mask_inputs(q, q_positions, kv_positions, q_segment_ids, kv_segment_ids):
    """Make the mask inputs depend on q for JAX's partial evaluation.

    Positions and segment ids are the same in every layer, so when the kernel runs inside a
    differentiated `lax.scan` over layers, JAX hoists everything computed from them alone out of
    the loop as loop-invariant residuals: masks and masked constants for every (query block, key
    block) tile, i.e. [T, S]-sized arrays. The barrier ties them to q, keeping that work per tile.
    """
    return jax.lax.optimization_barrier((q, q_positions, kv_positions, q_segment_ids, kv_segment_ids))


# Inside the tile loop every operand is laid out [blocks, B*Hkv, rows, D], with a query block's rows ordered
# (group head, query): each tile's products are then plain batched matmuls with the batch dimension first and
# the contraction last, and the group heads sharing a key head are rows of one matmul, so their key/value
# gradients sum inside it. XLA:CPU runs the [B, Hkv, G, T, D] einsums of the public layout 3-5x slower (transposes
# around a batched dot per tile: BENCHMARKS.md, "Blockwise attention layout").


def _pad_axis(x, axis, size, fill):
    pad = -x.shape[axis] % size
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=fill)


def _query_rows(x, tq):
    """[B, Hkv, G, T, ...] -> [nq, B*Hkv, G*tq, ...] (T padded with zeros to a multiple of tq)."""
    x = _pad_axis(x, 3, tq, 0)
    b, hkv, g, t = x.shape[:4]
    rest = x.shape[4:]
    x = x.reshape(b, hkv, g, t // tq, tq, *rest)
    x = jnp.moveaxis(x, 3, 0)  # [nq, B, Hkv, G, tq, ...]
    return x.reshape(t // tq, b * hkv, g * tq, *rest)


def _from_query_rows(x, b, hkv, g, t):
    """Inverse of `_query_rows`: [nq, B*Hkv, G*tq, ...] -> [B, Hkv, G, T, ...]."""
    nq, _, gt = x.shape[:3]
    rest = x.shape[3:]
    tq = gt // g
    x = x.reshape(nq, b, hkv, g, tq, *rest)
    x = jnp.moveaxis(x, 0, 3).reshape(b, hkv, g, nq * tq, *rest)
    return jax.lax.slice_in_dim(x, 0, t, axis=3)


def _grouped_queries(q, hkv, tq):
    """Queries [B, T, Hq, D] -> [nq, B*Hkv, G*tq, D]."""
    b, t, hq, d = q.shape
    return _query_rows(jnp.transpose(q.reshape(b, t, hkv, hq // hkv, d), (0, 2, 3, 1, 4)), tq)


def _key_rows(x, block):
    """Keys or values [B, S, Hkv, D] -> [nk, B*Hkv, block, D] (S padded with zeros)."""
    x = _pad_axis(x, 1, block, 0)
    b, s, hkv, d = x.shape
    x = x.reshape(b, s // block, block, hkv, d).transpose(1, 0, 3, 2, 4)
    return x.reshape(s // block, b * hkv, block, d)


def _from_key_rows(x, b, hkv, s):
    """Inverse of `_key_rows`: [nk, B*Hkv, block, D] -> [B, S, Hkv, D]."""
    nk, _, block, d = x.shape
    x = x.reshape(nk, b, hkv, block, d).transpose(1, 0, 3, 2, 4).reshape(b, nk * block, hkv, d)
    return x[:, :s]


def _token_blocks(x, size, fill):
    """[B, T] positions or segment ids -> [n, B, size]."""
    x = _pad_axis(x, 1, size, fill)
    return jnp.moveaxis(x.reshape(x.shape[0], -1, size), 1, 0)


def _block_mask(q_pos, q_seg, kv_pos, kv_seg, live, hkv, g):
    """[B*Hkv, G*tq, block] visibility: same non-padding segment and key not after query; `live` (0 or 1) is
    the schedule row's flag (0: a padding row, nothing visible)."""
    same = q_seg[:, :, None] == kv_seg[:, None, :]
    not_pad = (q_seg[:, :, None] != PAD_SEGMENT) & (kv_seg[:, None, :] != PAD_SEGMENT)
    causal = kv_pos[:, None, :] <= q_pos[:, :, None]
    mask = same & not_pad & causal & (live > 0)  # [B, tq, block]
    b, tq, block = mask.shape
    return jnp.broadcast_to(mask[:, None, None], (b, hkv, g, tq, block)).reshape(b * hkv, g * tq, block)


def _schedule(schedule, nq, nk):
    """The kernel's schedule as an int32 array; None = every tile."""
    if schedule is None:
        return jnp.asarray(tile_schedule(np.arange(nq), np.arange(nk), 1, 1, causal=False))
    return jnp.asarray(schedule, jnp.int32)


def _tiles(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, block_size, q_block_size):
    """Everything the tile loops index, in the loop layout."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    tq = min(q_block_size or block_size, t)
    k, v = jnp.asarray(k), jnp.asarray(v)
    return dict(
        q=_grouped_queries(q, hkv, tq), k=_key_rows(k, block_size), v=_key_rows(v, block_size),
        q_pos=_token_blocks(q_positions, tq, 0), q_seg=_token_blocks(q_segment_ids, tq, PAD_SEGMENT),
        kv_pos=_token_blocks(kv_positions, block_size, 0),
        kv_seg=_token_blocks(kv_segment_ids, block_size, PAD_SEGMENT),
        dims=(b, hkv, hq // hkv, t, k.shape[1], d, tq))


def blockwise_forward(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, block_size,
                      q_block_size=None, schedule=None):
    """Softmax attention statistics over all keys, tile by tile along `schedule` ([P, 3] rows of (query block,
    key block, live), as from `tile_schedule` with the same block sizes; may be traced, e.g. picked per device;
    None = every tile).

    Returns out [B, Hkv, G, T, D] (float32, normalised; zeros for rows that see nothing) and
    lse [B, Hkv, G, T] (float32 log-sum-exp of scaled scores; EMPTY_LSE for such rows).
    """
    q, q_positions, kv_positions, q_segment_ids, kv_segment_ids = _tie_mask_inputs(
        q, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    x = _tiles(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, block_size, q_block_size)
    b, hkv, g, t, _, d, _ = x["dims"]
    qs, scale = x["q"], d ** -0.5
    nq, n, rows = qs.shape[:3]

    def step(carry, row):
        i, j, live = row[0], row[1], row[2]
        m_all, l_all, acc_all = carry
        mask = _block_mask(x["q_pos"][i], x["q_seg"][i], x["kv_pos"][j], x["kv_seg"][j], live, hkv, g)
        m, l, acc = m_all[i], l_all[i], acc_all[i]
        s = jnp.einsum("ntd,nsd->nts", qs[i], x["k"][j], preferred_element_type=jnp.float32) * scale
        s = jnp.where(mask, s, _MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        correction = jnp.exp(m - m_new)
        pv = jnp.einsum("nts,nsd->ntd", p.astype(v.dtype), x["v"][j], preferred_element_type=jnp.float32)
        return (m_all.at[i].set(m_new), l_all.at[i].set(l * correction + p.sum(axis=-1)),
                acc_all.at[i].set(acc * correction[..., None] + pv)), None

    init = (jnp.full((nq, n, rows), _MASK_VALUE, jnp.float32), jnp.zeros((nq, n, rows), jnp.float32),
            jnp.zeros((nq, n, rows, d), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(step, init, _schedule(schedule, nq, x["k"].shape[0]))
    seen = l > 0
    out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), EMPTY_LSE)
    return _from_query_rows(out, b, hkv, g, t), _from_query_rows(lse, b, hkv, g, t)


def merge_stats(out_a, lse_a, out_b, lse_b):
    """Combine attention over two disjoint key sets from their normalised outputs and lse."""
    lse = jnp.logaddexp(lse_a, lse_b)
    out = out_a * jnp.exp(lse_a - lse)[..., None] + out_b * jnp.exp(lse_b - lse)[..., None]
    return out, lse


def ungroup_output(out, dtype):
    """[B, Hkv, G, T, D] -> [B, T, Hkv*G, D]."""
    b, hkv, g, t, d = out.shape
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, hkv * g, d).astype(dtype)


def group_cotangent(dout, hkv):
    """Output cotangent [B, T, Hq, D] -> [B, Hkv, G, T, D] float32 (inverse layout of ungroup_output)."""
    b, t, hq, d = dout.shape
    return jnp.transpose(dout.reshape(b, t, hkv, hq // hkv, d), (0, 2, 3, 1, 4)).astype(jnp.float32)


def output_delta(out, dout_g):
    """Row term of the softmax backward: sum_d(dout * out), [B, Hkv, G, T]."""
    return jnp.sum(out * dout_g, axis=-1)


def blockwise_backward(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, lse, delta, dout_g,
                       block_size, q_block_size=None, schedule=None):
    """Gradients for keys/values in `k`, `v` given the global row statistics, over the tiles of `schedule`
    (as in `blockwise_forward`).

    lse: [B, Hkv, G, T] log-sum-exp over *all* keys the rows attend to (possibly more than `k`);
    delta: [B, Hkv, G, T] = sum_d(dout * out) with the final output; dout_g: [B, Hkv, G, T, D] f32.
    Returns dq [B, T, Hq, D] (f32, contribution of these keys only), dk, dv [B, S, Hkv, D] (f32).
    """
    q, q_positions, kv_positions, q_segment_ids, kv_segment_ids = _tie_mask_inputs(
        q, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    x = _tiles(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, block_size, q_block_size)
    b, hkv, g, t, s_len, d, tq = x["dims"]
    lse_r, delta_r, dout_r = (_query_rows(a.astype(jnp.float32), tq) for a in (lse, delta, dout_g))
    scale = d ** -0.5

    def step(carry, row):
        i, j, live = row[0], row[1], row[2]
        dq_all, dk_all, dv_all = carry
        q_i, k_j, v_j, dout_i = x["q"][i], x["k"][j], x["v"][j], dout_r[i]
        mask = _block_mask(x["q_pos"][i], x["q_seg"][i], x["kv_pos"][j], x["kv_seg"][j], live, hkv, g)
        s = jnp.einsum("ntd,nsd->nts", q_i, k_j, preferred_element_type=jnp.float32) * scale
        p = jnp.where(mask, jnp.exp(jnp.where(mask, s, 0.0) - lse_r[i][..., None]), 0.0)
        dv = jnp.einsum("nts,ntd->nsd", p, dout_i)
        dp = jnp.einsum("ntd,nsd->nts", dout_i, v_j, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_r[i][..., None]) * scale
        dq = jnp.einsum("nts,nsd->ntd", ds, k_j, preferred_element_type=jnp.float32)
        dk = jnp.einsum("nts,ntd->nsd", ds, q_i, preferred_element_type=jnp.float32)
        return (dq_all.at[i].add(dq), dk_all.at[j].add(dk), dv_all.at[j].add(dv)), None

    kv_zeros = jnp.zeros(x["k"].shape, jnp.float32)
    init = (jnp.zeros(dout_r.shape, jnp.float32), kv_zeros, kv_zeros)
    (dq, dk, dv), _ = jax.lax.scan(step, init, _schedule(schedule, x["q"].shape[0], x["k"].shape[0]))
    dq = ungroup_output(_from_query_rows(dq, b, hkv, g, t), jnp.float32)
    return dq, _from_key_rows(dk, b, hkv, s_len), _from_key_rows(dv, b, hkv, s_len)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _flash(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, block_size, causal):
    return _flash_fwd(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, block_size, causal)[0]


def _self_schedule(t, s, block_size, causal):
    """Schedule for tokens in packed-row order; `causal` only when queries and keys are the same tokens."""
    tq = min(block_size, t)
    return tile_schedule(np.arange(t), np.arange(s), tq, block_size, causal=causal and t == s)


def _flash_fwd(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, block_size, causal):
    schedule = _self_schedule(q.shape[1], k.shape[1], block_size, causal)
    out, lse = blockwise_forward(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, block_size,
                                 schedule=schedule)
    residuals = (q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, out, lse)
    return ungroup_output(out, q.dtype), residuals


def _flash_bwd(block_size, causal, residuals, dout):
    q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, out, lse = residuals
    dout_g = group_cotangent(dout, k.shape[2])
    dq, dk, dv = blockwise_backward(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, lse,
                                    output_delta(out, dout_g), dout_g, block_size,
                                    schedule=_self_schedule(q.shape[1], k.shape[1], block_size, causal))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids, block_size=512,
                    packed_order=True):
    """Same contract as `attention.attend`, with memory linear in the key length.

    `packed_order` (self-attention only): tokens are in packed-row order (each segment contiguous, positions
    increasing along it), so tiles of keys after their queries are skipped. False visits every tile (exact for
    any positions, twice the causal work).
    """
    check_shapes(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    block_size = min(block_size, k.shape[1])
    return _flash(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, block_size, bool(packed_order))
