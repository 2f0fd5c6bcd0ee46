"""KV cache for batched, continuous decoding.

Each batch row is an independent slot with its own fill level. Cached keys carry their
positions and segment ids, so attention over the cache uses the very same masking rule as
training (`attention.attend`): unfilled slots have segment 0 and are never seen.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from t3rl_jax.models.attention import PAD_SEGMENT


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per-layer key/value buffers; every field has the batch (slot) on axis 0.

    One buffer per layer rather than a stacked [layers, ...] array, heads before length, and keys stored
    transposed ([B, kv_heads, head_dim, S]): a decode step then reads each layer's cache in place as the plain
    (non-transposed) operand of two batched matmuls over (b, kv_head). With the stacked [L, B, S, H, D] layout XLA
    copied and transposed every layer's cache on every step; with keys as [.., S, D] the score matmul ran at a
    quarter of the speed of the value matmul on XLA:CPU (numbers in BENCHMARKS.md, decode section).
    """

    k: tuple[jax.Array, ...]  # layers x [B, kv_heads, head_dim, S_max], keys after RoPE
    v: tuple[jax.Array, ...]  # layers x [B, kv_heads, S_max, head_dim]
    positions: jax.Array  # [B, S_max] int32
    segment_ids: jax.Array  # [B, S_max] int32, PAD_SEGMENT where unfilled
    lengths: jax.Array  # [B] int32, filled slots per row (writes go at this offset)

    @classmethod
    def init(cls, *, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
             dtype=jnp.float32) -> "KVCache":
        k_shape, v_shape = (batch, num_kv_heads, head_dim, max_len), (batch, num_kv_heads, max_len, head_dim)
        return cls(k=tuple(jnp.zeros(k_shape, dtype) for _ in range(num_layers)),
                   v=tuple(jnp.zeros(v_shape, dtype) for _ in range(num_layers)),
                   positions=jnp.zeros((batch, max_len), jnp.int32),
                   segment_ids=jnp.full((batch, max_len), PAD_SEGMENT, jnp.int32),
                   lengths=jnp.zeros((batch,), jnp.int32))

    @classmethod
    def for_config(cls, config, *, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        return cls.init(num_layers=config.num_layers, batch=batch, max_len=max_len,
                        num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=dtype)

    @property
    def max_len(self) -> int:
        return self.segment_ids.shape[1]

    @property
    def batch(self) -> int:
        return self.segment_ids.shape[0]

    @property
    def num_layers(self) -> int:
        return len(self.k)

    def logical_axes(self) -> "KVCache":
        """Logical axis names per field, for the sharding layer (same tree structure as this cache)."""
        k = tuple(("batch", "kv_heads", "head_dim", "cache_length") for _ in range(self.num_layers))
        v = tuple(("batch", "kv_heads", "cache_length", "head_dim") for _ in range(self.num_layers))
        return KVCache(k=k, v=v, positions=("batch", "cache_length"), segment_ids=("batch", "cache_length"),
                       lengths=("batch",))


def write_indices(lengths: jax.Array, segment_ids: jax.Array, max_len: int) -> jax.Array:
    """Cache slot [B, T] for each new token: valid tokens go consecutively after the row's fill
    level, wherever padding sits in the chunk; padding gets `max_len` (out of range, dropped)."""
    valid = segment_ids != PAD_SEGMENT
    offsets = jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1
    return jnp.where(valid, lengths[:, None] + offsets, max_len)


def append_tokens(cache: KVCache, positions: jax.Array, segment_ids: jax.Array) -> tuple[KVCache, jax.Array]:
    """Record the new tokens' positions / segment ids; returns (cache, write indices).

    The caller must leave room: tokens past `max_len` are dropped (lengths saturate at max_len),
    so an engine checks capacity on the host before decoding.
    """
    idx = write_indices(cache.lengths, segment_ids, cache.max_len)
    # Row by row (vmap) so the scatter keeps a batch dimension and stays local to each slot's device.
    put = jax.vmap(lambda row, i, new: row.at[i].set(new.astype(jnp.int32), mode="drop"))
    new_positions = put(cache.positions, idx, positions)
    new_segments = put(cache.segment_ids, idx, segment_ids)
    added = jnp.sum(segment_ids != PAD_SEGMENT, axis=1, dtype=jnp.int32)
    lengths = jnp.minimum(cache.lengths + added, cache.max_len)
    return dataclasses.replace(cache, positions=new_positions, segment_ids=new_segments, lengths=lengths), idx


def insert_rows(cache: KVCache, rows: KVCache, slot) -> KVCache:
    """Copy a (prefill) cache of b rows into slots [slot, slot + b) of `cache` (same max_len)."""
    if rows.max_len != cache.max_len:
        raise ValueError(f"insert_rows: prefix max_len {rows.max_len} != cache max_len {cache.max_len}")

    def put(dst, src):
        start = (slot,) + (0,) * (dst.ndim - 1)
        return jax.lax.dynamic_update_slice(dst, src.astype(dst.dtype), start)

    return jax.tree.map(put, cache, rows)


def gather_rows(cache: KVCache, slots: jax.Array) -> KVCache:
    """Rows `slots` [n] of the cache as an n-row cache (out-of-range slots give empty rows)."""
    return jax.tree.map(lambda x: jnp.take(x, slots, axis=0, mode="fill", fill_value=0), cache)


def scatter_rows(cache: KVCache, rows: KVCache, slots: jax.Array) -> KVCache:
    """Write an n-row cache back into rows `slots` [n] (out-of-range slots are dropped: padding rows)."""
    return jax.tree.map(lambda dst, src: dst.at[slots].set(src.astype(dst.dtype), mode="drop"), cache, rows)


def clear_rows(cache: KVCache, rows_to_clear: jax.Array) -> KVCache:
    """Mark rows (bool [B]) empty; their stale keys stay but carry segment 0, so no query sees them."""
    keep = ~rows_to_clear
    return dataclasses.replace(cache, segment_ids=jnp.where(keep[:, None], cache.segment_ids, PAD_SEGMENT),
                               lengths=jnp.where(keep, cache.lengths, 0))


EXTEND_QUERY_BLOCK = 128


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotRowsLayerCache:
    """One layer of a multi-slot extend (a `decoder_layer` cache: `write`, `visible`, `mask`).

    Attention reads `rows_k` / `rows_v`: the computed rows' cached history, gathered from their base slots (only the
    first `window` positions), with this call's keys written in. `write` also scatters this call's keys straight
    into the decode state's buffers `k` / `v` at each output slot's positions, so a layer's gathered rows die with
    the layer (holding every layer's gathered rows until one final scatter kept ~40 GiB live on stage 1) and only
    the new tokens are written (rather than whole rows of `max_len`).
    """

    k: jax.Array  # [B, Hkv, D, S] the decode state's buffer
    v: jax.Array  # [B, Hkv, S, D]
    rows_k: jax.Array  # [U, Hkv, D, W]
    rows_v: jax.Array  # [U, Hkv, W, D]
    row_write_idx: jax.Array  # [U, T] where each new token goes in its row (W: padding, dropped)
    mask: jax.Array  # [U, T, W]
    slots: jax.Array  # [N] output slots (B: padding, dropped)
    sources: jax.Array  # [N] computed row of each output slot
    slot_write_idx: jax.Array  # [N, T] where each new token goes in its output slot (S: dropped)
    # Queries per attention tile: scores of one tile are [U, Hq, query_block, W] f32 (at 512 queries x 18,432 cached
    # tokens x 32 heads, 1.1 GiB per row), so long extends against a full window go in smaller tiles.
    query_block: int = dataclasses.field(default=EXTEND_QUERY_BLOCK, metadata=dict(static=True))

    def write(self, k, v) -> "SlotRowsLayerCache":
        """k, v: [U, T, Hkv, D] of this call's tokens."""
        put_k = jax.vmap(lambda buf, idx, new: buf.at[:, :, idx].set(new.transpose(1, 2, 0).astype(buf.dtype),
                                                                    mode="drop"))
        put_v = jax.vmap(lambda buf, idx, new: buf.at[:, idx].set(new.transpose(1, 0, 2).astype(buf.dtype),
                                                                 mode="drop"))
        k_out, v_out = jnp.take(k, self.sources, axis=0), jnp.take(v, self.sources, axis=0)  # [N, T, Hkv, D]
        rows, idx = self.slots[:, None], self.slot_write_idx
        # Advanced indices on axes (0, 3) / (0, 2) put the [N, T] index dimensions first: [N, T, Hkv, D].
        big_k = self.k.at[rows, :, :, idx].set(k_out.astype(self.k.dtype), mode="drop")
        big_v = self.v.at[rows, :, idx, :].set(v_out.astype(self.v.dtype), mode="drop")
        return dataclasses.replace(self, k=big_k, v=big_v, rows_k=put_k(self.rows_k, self.row_write_idx, k),
                                   rows_v=put_v(self.rows_v, self.row_write_idx, v))

    def visible(self):
        return self.rows_k, self.rows_v


def gather_history(buffer: jax.Array, base_slots: jax.Array, window: int, length_axis: int) -> jax.Array:
    """Rows `base_slots` [U] of one cache buffer, first `window` positions (out-of-range slots: zeros)."""
    kept = jax.lax.slice_in_dim(buffer, 0, window, axis=length_axis)
    return jnp.take(kept, base_slots, axis=0, mode="fill", fill_value=0)
