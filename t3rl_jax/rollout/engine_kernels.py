"""The engine's traced computations (jitted by `Qwen3Engine`): JetStream's one-row prefill and insert, the
multi-step decode loop, cutting a slot back, and the token sampling they share. The multi-slot extend is
`engine_extend.py`'s.

Every sampled token is drawn with a key derived from (slot seed, token position), so an episode's tokens do not
depend on which slot it runs in or on what else is in the batch; log-probs come back with the tokens (those of the
distribution sampled from, see `sampling`). Ids at or above `valid_vocab_size` (the embedding's padding rows) are
never sampled.

On a mesh a decode call gathers the weights once (`decode_weight_shardings`: every axis but `tensor` dropped) and
then each device steps its own slots with no float crossing devices.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from t3rl_jax.models import kv_cache as kvc
from t3rl_jax.models.attention import PAD_SEGMENT
from t3rl_jax.rollout import sampling
from t3rl_jax.rollout.decode_state import DecodeLayout, DecodeState, SamplingSettings
from t3rl_jax.sharding import spec_axes


def _decode_sharding(array, drop_leading: bool):
    """A weight's sharding for decoding: its own without every mesh axis but `tensor` (tensor parallelism stays,
    FSDP-style splits are gathered), without the leading `layers` entry when `drop_leading`. None when the array is
    not on a multi-device mesh."""
    sharding = getattr(array, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding) or sharding.mesh.size == 1:
        return None
    spec = tuple(sharding.spec) + (None,) * (array.ndim - len(sharding.spec))
    kept = [tuple(a for a in spec_axes(entry) if a == "tensor") or None for entry in spec[int(drop_leading):]]
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(
        *(entry[0] if entry else None for entry in kept)))


def _is_layer_path(path) -> bool:
    first = path[0] if path else None
    return getattr(first, "key", getattr(first, "name", None)) == "layers"


def decode_weight_shardings(params) -> tuple[dict | None, object]:
    """(per-layer shardings of the stacked layer weights or None off a mesh, the other weights' shardings).

    The embedding table (and LM head, final norm) is gathered once per decode call like the layer weights: left
    FSDP-sharded, every decode step's lookup and logits moved floats between devices."""
    stacked = nnx.to_pure_dict(params)["layers"]
    layers = {name: _decode_sharding(array, True) for name, array in stacked.items()}
    others = jax.tree_util.tree_map_with_path(
        lambda path, a: None if _is_layer_path(path) else _decode_sharding(a, False), params)
    return (None if any(v is None for v in layers.values()) else layers), others


@dataclasses.dataclass(frozen=True, eq=False)
class EngineKernels:
    """What the traced functions close over: the model's structure (not its parameters), the decode layout, the
    stop ids, the vocabulary bound and the engine's default sampling settings."""

    graphdef: object
    rest: object
    layout: DecodeLayout
    stop_ids: jax.Array
    valid_vocab_size: int | None
    sampling: SamplingSettings
    layer_shardings: dict | None
    other_shardings: object

    @property
    def max_cache_length(self) -> int:
        return self.layout.max_len

    def model(self, params):
        return nnx.merge(self.graphdef, params, self.rest)

    def sample_at(self, model, hidden, seeds, positions, temperature, top_p, top_k, use_top_p):
        logits = model.logits_from_hidden(hidden)
        keys = sampling.token_keys(seeds, positions)
        return sampling.sample_rows(keys, logits, temperature=temperature, top_p=top_p, top_k=top_k,
                                    use_top_p=use_top_p, valid_vocab_size=self.valid_vocab_size)

    # ------------------------------------------------------------------ JetStream's prefill / insert
    def _run_chunk(self, params, cache, tokens, true_length, seed, temperature, top_p, top_k, use_top_p):
        """Append tokens[1, T] (first true_length valid) to a one-row cache; sample the next token."""
        model = self.model(params)
        t = tokens.shape[1]
        start = cache.lengths[0]
        idx = jnp.arange(t, dtype=jnp.int32)
        positions = (start + idx)[None]
        segments = (idx < true_length).astype(jnp.int32)[None]
        hidden, cache = model.hidden_states(tokens.astype(jnp.int32), positions, segments, cache)
        last = jax.lax.dynamic_index_in_dim(hidden[0], true_length - 1, axis=0, keepdims=True)
        token, logprob = self.sample_at(model, last, seed[None], (start + true_length)[None], temperature[None],
                                        top_p[None], top_k, use_top_p)
        return cache, token, logprob

    def prefill(self, params, existing, tokens, true_length, seed, temperature, top_p, *, top_k, use_top_p):
        t = tokens.shape[1]
        config, dtype = self.layout.config, self.layout.cache_dtype
        if existing is None:
            cache = kvc.KVCache.for_config(config, batch=1, max_len=t, dtype=dtype)
        else:
            cache = existing["cache"]

            def grow(x, axis):
                pad = [(0, 0)] * x.ndim
                pad[axis] = (0, t)
                return jnp.pad(x, pad)

            cache = kvc.KVCache(k=tuple(grow(k, 3) for k in cache.k), v=tuple(grow(v, 2) for v in cache.v),
                                positions=grow(cache.positions, 1), segment_ids=grow(cache.segment_ids, 1),
                                lengths=cache.lengths)
        cache, token, logprob = self._run_chunk(params, cache, tokens, true_length, seed, temperature, top_p,
                                                top_k, use_top_p)
        return {"cache": cache, "token": token, "logprob": logprob, "seed": seed[None]}

    def insert(self, prefix, state: DecodeState, slot):
        src = prefix["cache"]
        pad = self.max_cache_length - src.max_len
        k_pad, v_pad = ((0, 0), (0, 0), (0, 0), (0, pad)), ((0, 0), (0, 0), (0, pad), (0, 0))
        row = kvc.KVCache(
            k=tuple(jnp.pad(k, k_pad) for k in src.k), v=tuple(jnp.pad(v, v_pad) for v in src.v),
            positions=jnp.pad(src.positions, ((0, 0), (0, pad))),
            segment_ids=jnp.pad(src.segment_ids, ((0, 0), (0, pad)), constant_values=PAD_SEGMENT),
            lengths=src.lengths)
        token = prefix["token"][0]
        return self.layout.constrain(DecodeState(
            cache=kvc.insert_rows(state.cache, row, slot),
            tokens=state.tokens.at[slot].set(token),
            active=state.active.at[slot].set(~jnp.isin(token, self.stop_ids)),
            seeds=state.seeds.at[slot].set(prefix["seed"][0]),
            temperature=state.temperature.at[slot].set(self.sampling.temperature),
            top_p=state.top_p.at[slot].set(self.sampling.top_p),
            limits=state.limits.at[slot].set(self.max_cache_length)))

    # ------------------------------------------------------------------ decode
    def decoding_params(self, params):
        """Params with every weight but the stacked layers cast to the compute dtype and gathered."""
        cdt = self.model(params).compute_dtype

        def gather(p, sharding):
            if sharding is None:
                return p
            p = p.astype(cdt) if jnp.issubdtype(p.dtype, jnp.floating) else p
            return jax.lax.with_sharding_constraint(p, sharding)

        return jax.tree.map(gather, params, self.other_shardings,
                            is_leaf=lambda x: x is None or isinstance(x, jax.sharding.Sharding))

    def generate(self, params, state: DecodeState, *, num_steps: int, window: int | None = None, top_k, use_top_p):
        model = self.model(self.decoding_params(params))
        window = state.cache.max_len if window is None else window
        layer_params = model.layers.per_layer(model.compute_dtype)  # sliced and cast once per call, not per step
        if self.layer_shardings is not None:
            # Gathered here, once per call: left FSDP-sharded, every step all-gathers every layer's weights.
            layer_params = [{k: jax.lax.with_sharding_constraint(v, self.layer_shardings[k])
                             for k, v in p.items()} for p in layer_params]
        constrain = self.layout.constrain

        def step(state, _):
            cache = state.cache
            positions = cache.lengths[:, None]
            active = state.active & (cache.lengths < state.limits)
            segments = active.astype(jnp.int32)[:, None]
            hidden, cache = model.hidden_states(state.tokens[:, None], positions, segments, cache,
                                                cache_window=window, layer_params=layer_params)
            token, logprob = self.sample_at(model, hidden[:, 0], state.seeds, positions[:, 0] + 1,
                                            state.temperature, state.top_p, top_k, use_top_p)
            token = jnp.where(active, token, state.tokens)
            still = active & ~jnp.isin(token, self.stop_ids) & (cache.lengths < state.limits)
            new = constrain(dataclasses.replace(state, cache=cache, tokens=token, active=still))
            return new, (token, logprob, active, cache.lengths)

        state, (tokens, logprobs, valid, lengths) = jax.lax.scan(step, constrain(state), None, length=num_steps)
        return state, tokens, logprobs, valid, lengths

    def finish(self, state: DecodeState, slot, length):
        """Stop a slot and cut its cache back to `length` tokens (drops tokens decoded past a stop)."""
        c = state.cache
        keep = jnp.arange(c.max_len) < length
        segs = c.segment_ids.at[slot].set(jnp.where(keep, c.segment_ids[slot], PAD_SEGMENT))
        cache = dataclasses.replace(c, segment_ids=segs, lengths=c.lengths.at[slot].set(length))
        return self.layout.constrain(dataclasses.replace(state, cache=cache, active=state.active.at[slot].set(False)))
