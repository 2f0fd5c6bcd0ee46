"""The multi-slot extend, traced: append tokens to several slots' own caches in one call and sample one token per
slot (the rollout scheduler's prefill; the host side that lays out its arrays is `extend_batch.py`).

Multi-turn prefix reuse: a tool response is prefilled on top of the history already cached in its slot, episodes
starting together share one call, and a GRPO group's identical prompts one computed row. Re-prefilling the whole
history every turn would cost O(turns x context) prefill FLOPs on BFCL conversations of tens of thousands of tokens.

On a mesh the computed rows stay split over the slot axes (no device computes or holds all of them) and each
layer's new keys are written into the slots as the layer is computed (`kv_cache.SlotRowsLayerCache`), so no layer's
gathered rows outlive the layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from t3rl_jax.models import kv_cache as kvc
from t3rl_jax.models.attention import PAD_SEGMENT, attention_mask
from t3rl_jax.rollout.decode_state import DecodeState
from t3rl_jax.rollout.engine_kernels import EngineKernels


def extend(kernels: EngineKernels, params, state: DecodeState, slots, sources, base_slots, tokens, true_lengths,
           resets, seeds, temperature, top_p, limits, *, window, top_k, use_top_p):
    """Prefill u computed rows and fan them out to n slots (a GRPO group's shared prompt is computed once).

    Computed row r extends slot base_slots[r]'s history (none when resets[r]) with tokens[r, :true_lengths[r]];
    output row i (slot slots[i]) takes computed row sources[i] and samples its own first token with its own
    seed. Padding rows point at slot B: gathered empty, dropped on the way back. A continuing output row's slot
    is its computed row's base slot (`extend_batch.pack`), so every slot gets its new tokens written at its own
    fill level; a fresh slot is emptied first. Returns (state, tokens [n], logprobs [n], cache lengths [n]).
    """
    layout = kernels.layout
    model = kernels.model(params)
    cache = layout.constrain(state).cache
    u, t = tokens.shape
    rows = layout.row_sharding(u)

    def split(x):  # computed rows stay split over the slot axes: no device computes (or holds) all of them
        return jax.lax.with_sharding_constraint(x, rows) if layout.mesh.size > 1 else x

    tokens, true_lengths, resets, base_slots = map(split, (tokens, true_lengths, resets, base_slots))
    held = jnp.where(resets, 0, cache.lengths.at[base_slots].get(mode="fill", fill_value=0))
    hist_positions = split(kvc.gather_history(cache.positions, base_slots, window, 1))
    hist_segments = split(jnp.where(resets[:, None], PAD_SEGMENT,
                                    kvc.gather_history(cache.segment_ids, base_slots, window, 1)))
    idx = jnp.arange(t, dtype=jnp.int32)[None]
    positions = held[:, None] + idx
    segments = (idx < true_lengths[:, None]).astype(jnp.int32)
    row_write = kvc.write_indices(held, segments, window)  # [u, t]; padding -> window (dropped)
    put = jax.vmap(lambda row, i, new: row.at[i].set(new, mode="drop"))
    row_positions = put(hist_positions, row_write, positions)
    row_segments = put(hist_segments, row_write, segments)
    mask = split(attention_mask(positions, row_positions, segments, row_segments))
    # Where each output slot's new tokens go in the decode state; padding tokens -> max_len (dropped).
    out_write = jnp.take(jnp.where(row_write < window, row_write, cache.max_len), sources, axis=0)

    def layer_cache(i):
        return kvc.SlotRowsLayerCache(
            k=cache.k[i], v=cache.v[i],
            rows_k=split(kvc.gather_history(cache.k[i], base_slots, window, 3)),
            rows_v=split(kvc.gather_history(cache.v[i], base_slots, window, 2)),
            row_write_idx=row_write, mask=mask, slots=slots, sources=sources, slot_write_idx=out_write)

    hidden, layers = model.hidden_states(tokens, positions, segments, layer_cache_fn=layer_cache)
    last = jnp.take_along_axis(hidden, jnp.maximum(true_lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    fresh = jnp.take(resets, sources)
    lengths = jnp.minimum(jnp.take(held + true_lengths, sources), cache.max_len)
    seeds = jnp.where(fresh, seeds, state.seeds.at[slots].get(mode="fill", fill_value=0))
    token, logprob = kernels.sample_at(model, jnp.take(last, sources, axis=0), seeds, lengths,
                                       temperature, top_p, top_k, use_top_p)

    def put_slots(x, value):
        return x.at[slots].set(value, mode="drop")

    emptied = kvc.clear_rows(cache, put_slots(jnp.zeros((cache.batch,), bool), fresh))
    written = put_slots(jnp.zeros((cache.batch,), bool), True)
    out_positions = jnp.take(positions, sources, axis=0)
    out_segments = jnp.take(segments, sources, axis=0)
    new_cache = kvc.KVCache(
        k=tuple(c.k for c in layers), v=tuple(c.v for c in layers),
        positions=emptied.positions.at[slots[:, None], out_write].set(out_positions, mode="drop"),
        segment_ids=emptied.segment_ids.at[slots[:, None], out_write].set(out_segments, mode="drop"),
        lengths=jnp.where(written, emptied.lengths.at[slots].set(lengths, mode="drop"), emptied.lengths))
    state = DecodeState(
        cache=new_cache,
        tokens=put_slots(state.tokens, token),
        active=put_slots(state.active, ~jnp.isin(token, kernels.stop_ids) & (lengths < limits)),
        seeds=put_slots(state.seeds, seeds), temperature=put_slots(state.temperature, temperature),
        top_p=put_slots(state.top_p, top_p), limits=put_slots(state.limits, limits))
    return layout.constrain(state), token, logprob, lengths
