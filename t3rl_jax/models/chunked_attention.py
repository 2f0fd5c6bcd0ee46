"""Exact attention over key/value blocks (online softmax) with a hand-written backward.

`attend` materialises a [B, H, T, S] score tensor; at 32k tokens that is terabytes. Here keys are
visited in blocks of `block_size`, so only [B, H, T, block] scores exist at a time, and the
backward recomputes block scores from the saved log-sum-exp instead of storing them (autodiff
through the block loop would save every block's scores and bring the full matrix back).

Queries are tiled too, and a (query block, key block) tile with no visible pair is skipped
(`lax.cond`): causal masking then halves the work, and with the load-balanced token order of
context parallelism every device skips the same share.

The forward/backward halves are public so context parallelism can run them on key/value blocks
that arrive from other devices and merge the per-block statistics.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

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


def _split_blocks(x, size, fill, axis=1):
    """Cut `axis` into blocks of `size` (padding with `fill`) and move the block index to the front."""
    pad = -x.shape[axis] % size
    if pad:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, pad)
        x = jnp.pad(x, widths, constant_values=fill)
    x = x.reshape(*x.shape[:axis], -1, size, *x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _join_blocks(x, axis, length):
    """Inverse of `_split_blocks` on a stacked result: blocks back into `axis`, padding cut."""
    x = jnp.moveaxis(x, 0, axis)
    x = x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2:])
    return jax.lax.slice_in_dim(x, 0, length, axis=axis)


def _kv_blocks(k, v, kv_positions, kv_segment_ids, block_size):
    return (_split_blocks(k, block_size, 0), _split_blocks(v, block_size, 0),
            _split_blocks(kv_positions, block_size, 0), _split_blocks(kv_segment_ids, block_size, PAD_SEGMENT))


def _tie_mask_inputs(q, q_positions, kv_positions, q_segment_ids, kv_segment_ids):
    """Make the mask inputs depend on q for JAX's partial evaluation.

    Positions and segment ids are the same in every layer, so when the kernel runs inside a
    differentiated `lax.scan` over layers, JAX hoists everything computed from them alone out of
    the loop as loop-invariant residuals: masks and masked constants for every (query block, key
    block) tile, i.e. [T, S]-sized arrays. The barrier ties them to q, keeping that work per tile.
    """
    return jax.lax.optimization_barrier((q, q_positions, kv_positions, q_segment_ids, kv_segment_ids))


def _block_mask(q_positions, q_segment_ids, kv_pos_blk, kv_seg_blk):
    """[B, 1, 1, Tq, block] visibility: same non-padding segment and key not after query."""
    same = q_segment_ids[:, :, None] == kv_seg_blk[:, None, :]
    not_pad = (q_segment_ids[:, :, None] != PAD_SEGMENT) & (kv_seg_blk[:, None, :] != PAD_SEGMENT)
    causal = kv_pos_blk[:, None, :] <= q_positions[:, :, None]
    return (same & not_pad & causal)[:, None, None]


def _group_queries(q, hkv):
    b, t, hq, d = q.shape
    return q.reshape(b, t, hkv, hq // hkv, d)


def _forward_q_block(qg, q_pos, q_seg, kv_blocks, v_dtype, scale):
    """Online softmax of one query block over all key blocks; fully masked (query, key) blocks are
    skipped, which is where causal load balancing pays off: each device skips the same amount."""
    b, t, hkv, g, d = qg.shape

    def step(carry, blk):
        k_blk, v_blk, pos_blk, seg_blk = blk
        mask = _block_mask(q_pos, q_seg, pos_blk, seg_blk)

        def update(carry):
            m, l, acc = carry
            s = jnp.einsum("btkgd,bskd->bkgts", qg, k_blk, preferred_element_type=jnp.float32) * scale
            s = jnp.where(mask, s, _MASK_VALUE)
            m_new = jnp.maximum(m, s.max(axis=-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            correction = jnp.exp(m - m_new)
            pv = jnp.einsum("bkgts,bskd->bkgtd", p.astype(v_dtype), v_blk, preferred_element_type=jnp.float32)
            return m_new, l * correction + p.sum(axis=-1), acc * correction[..., None] + pv

        return jax.lax.cond(jnp.any(mask), update, lambda c: c, carry), None

    init = (jnp.full((b, hkv, g, t), _MASK_VALUE, jnp.float32), jnp.zeros((b, hkv, g, t), jnp.float32),
            jnp.zeros((b, hkv, g, t, d), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(step, init, kv_blocks)
    seen = l > 0
    out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), EMPTY_LSE)
    return out, lse


def blockwise_forward(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, block_size,
                      q_block_size=None):
    """Softmax attention statistics over all keys, in (query block, key block) tiles.

    Returns out [B, Hkv, G, T, D] (float32, normalised; zeros for rows that see nothing) and
    lse [B, Hkv, G, T] (float32 log-sum-exp of scaled scores; EMPTY_LSE for such rows).
    """
    q, q_positions, kv_positions, q_segment_ids, kv_segment_ids = _tie_mask_inputs(
        q, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    t, d, hkv = q.shape[1], q.shape[3], k.shape[2]
    tq = min(q_block_size or block_size, t)
    kv_blocks = _kv_blocks(k, v, kv_positions, kv_segment_ids, block_size)
    q_blocks = (_split_blocks(q, tq, 0), _split_blocks(q_positions, tq, 0),
                _split_blocks(q_segment_ids, tq, PAD_SEGMENT))

    def one(args):
        q_blk, pos_blk, seg_blk = args
        return _forward_q_block(_group_queries(q_blk, hkv), pos_blk, seg_blk, kv_blocks, v.dtype, d ** -0.5)

    out, lse = jax.lax.map(one, q_blocks)
    return _join_blocks(out, 3, t), _join_blocks(lse, 3, t)


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


def _backward_q_block(qg, q_pos, q_seg, lse, delta, dout_g, kv_blocks, dkv, scale):
    """dq of one query block; its dK/dV are added in place into dkv = (dk, dv), each
    [S/block, B, block, Hkv, D] f32 (one running buffer each, not one per query block)."""
    num_blocks = kv_blocks[0].shape[0]

    def step(carry, blk):
        j, k_blk, v_blk, pos_blk, seg_blk = blk
        mask = _block_mask(q_pos, q_seg, pos_blk, seg_blk)

        def compute(carry):
            dq, dk_all, dv_all = carry
            s = jnp.einsum("btkgd,bskd->bkgts", qg, k_blk, preferred_element_type=jnp.float32) * scale
            p = jnp.where(mask, jnp.exp(jnp.where(mask, s, 0.0) - lse[..., None]), 0.0)
            dv = jnp.einsum("bkgts,bkgtd->bskd", p, dout_g)
            dp = jnp.einsum("bkgtd,bskd->bkgts", dout_g, v_blk, preferred_element_type=jnp.float32)
            ds = p * (dp - delta[..., None]) * scale
            dq = dq + jnp.einsum("bkgts,bskd->bkgtd", ds, k_blk, preferred_element_type=jnp.float32)
            dk = jnp.einsum("bkgts,btkgd->bskd", ds, qg, preferred_element_type=jnp.float32)
            return dq, dk_all.at[j].add(dk), dv_all.at[j].add(dv)

        return jax.lax.cond(jnp.any(mask), compute, lambda c: c, carry), None

    init = (jnp.zeros(dout_g.shape, jnp.float32), *dkv)
    (dq, dk, dv), _ = jax.lax.scan(step, init, (jnp.arange(num_blocks), *kv_blocks))
    return dq, (dk, dv)


def blockwise_backward(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, lse, delta, dout_g,
                       block_size, q_block_size=None):
    """Gradients for keys/values in `k`, `v` given the global row statistics.

    lse: [B, Hkv, G, T] log-sum-exp over *all* keys the rows attend to (possibly more than `k`);
    delta: [B, Hkv, G, T] = sum_d(dout * out) with the final output; dout_g: [B, Hkv, G, T, D] f32.
    Returns dq [B, T, Hq, D] (f32, contribution of these keys only), dk, dv [B, S, Hkv, D] (f32).
    """
    q, q_positions, kv_positions, q_segment_ids, kv_segment_ids = _tie_mask_inputs(
        q, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    t, d, hkv, s_len = q.shape[1], q.shape[3], k.shape[2], k.shape[1]
    tq = min(q_block_size or block_size, t)
    kv_blocks = _kv_blocks(k, v, kv_positions, kv_segment_ids, block_size)
    q_blocks = (_split_blocks(q, tq, 0), _split_blocks(q_positions, tq, 0),
                _split_blocks(q_segment_ids, tq, PAD_SEGMENT), _split_blocks(lse, tq, 0.0, axis=3),
                _split_blocks(delta, tq, 0.0, axis=3), _split_blocks(dout_g, tq, 0.0, axis=3))

    def one(dkv, args):
        q_blk, pos_blk, seg_blk, lse_blk, delta_blk, dout_blk = args
        dq, dkv = _backward_q_block(_group_queries(q_blk, hkv), pos_blk, seg_blk, lse_blk, delta_blk, dout_blk,
                                    kv_blocks, dkv, d ** -0.5)
        return dkv, dq

    zeros = jnp.zeros(kv_blocks[0].shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(one, (zeros, zeros), q_blocks)
    unblock = lambda x: _join_blocks(x, 1, s_len)
    return ungroup_output(_join_blocks(dq, 3, t), jnp.float32), unblock(dk), unblock(dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, block_size):
    out, _ = blockwise_forward(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, block_size)
    return ungroup_output(out, q.dtype)


def _flash_fwd(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, block_size):
    out, lse = blockwise_forward(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, block_size)
    residuals = (q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, out, lse)
    return ungroup_output(out, q.dtype), residuals


def _flash_bwd(block_size, residuals, dout):
    q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, out, lse = residuals
    dout_g = group_cotangent(dout, k.shape[2])
    dq, dk, dv = blockwise_backward(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, lse,
                                    output_delta(out, dout_g), dout_g, block_size)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids, block_size=512):
    """Same contract as `attention.attend`, with memory linear in the key length."""
    check_shapes(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    block_size = min(block_size, k.shape[1])
    return _flash(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, block_size)
