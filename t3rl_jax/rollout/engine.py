"""Qwen3Engine: JetStream's `Engine` interface over our Flax Qwen3 with a slot-based KV cache.

Two ways in:
- JetStream's own API (`prefill` -> `insert` -> `generate`), used by JetStream's orchestrator and gRPC server
  (`scripts/serve.py`). `prefill` accepts an `existing_prefix` and extends it without recomputing it.
- The rollout driver's fast path: `extend_slots` appends tokens to slots' *own* caches in place, several slots per
  call (multi-turn prefix reuse: a tool response is prefilled on top of the history already cached in that slot;
  episodes starting together share one call, and a GRPO group's identical prompts one computed row), and
  `generate_steps` runs several decode steps in one jitted call, attending over only as much of the cache as the
  caller says the slots hold. Re-prefilling the whole history every turn would cost
  O(turns x context) prefill FLOPs on BFCL conversations that reach tens of thousands of tokens.

Every sampled token is drawn with a key derived from (slot seed, token position), so an episode's tokens do not
depend on which slot it runs in or on what else is in the batch; log-probs come back with the tokens (those of the
distribution sampled from, see `sampling`). Ids the tokenizer cannot produce (the embedding's padding rows) are
never sampled.

On a mesh the decode state is split over every mesh axis that divides the slots (`decode_state_shardings`); a
decode call gathers the weights once and then each device steps its own slots with no float crossing devices.
A multi-slot extend keeps its computed rows split over the same axes and writes each layer's new keys into the
slots as the layer is computed. `compile_targets` hands the jitted pieces and their abstract arguments to the
fit check.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t3rl_jax.models import kv_cache as kvc
from t3rl_jax.models.attention import PAD_SEGMENT, attention_mask
from t3rl_jax.rollout import extend_batch, sampling
from t3rl_jax.rollout.extend_batch import ExtendRequest
from t3rl_jax.rollout.jetstream_api import (QwenJetStreamTokenizer, engine_api, logprob_column, pack_result_tokens,
                                            tokenizer_api)
from t3rl_jax.sharding import spec_axes

MIN_CACHE_WINDOW = 16  # smallest attention window over the cache (powers of two above it bound recompiles)
SLOT_AXES = ("data", "fsdp", "sequence")  # mesh axes the decode state's slots (and an extend's rows) split over


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    cache: kvc.KVCache
    tokens: jax.Array       # [B] int32: last sampled token, fed at the next decode step
    active: jax.Array       # [B] bool: the slot is generating
    seeds: jax.Array        # [B] uint32: sampling seed of the slot's episode
    temperature: jax.Array  # [B] float32
    top_p: jax.Array        # [B] float32
    limits: jax.Array       # [B] int32: stop once the cache holds this many tokens


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


def _decode_layer_shardings(stacked: dict) -> dict | None:
    """Per-layer decode shardings of the stacked layer weights (None off a mesh)."""
    out = {name: _decode_sharding(array, True) for name, array in stacked.items()}
    return None if any(v is None for v in out.values()) else out


def _is_layer_path(path) -> bool:
    first = path[0] if path else None
    return getattr(first, "key", getattr(first, "name", None)) == "layers"


class Qwen3Engine(engine_api.Engine):
    def __init__(self, model, *, tokenizer=None, max_concurrent_decodes: int = 8, max_prefill_length: int = 4096,
                 max_cache_length: int = 8192, sampling: SamplingSettings = SamplingSettings(),
                 cache_dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None, seed: int = 0,
                 stop_ids: tuple[int, ...] = (151645, 151643), valid_vocab_size: int | None = None):
        """`valid_vocab_size`: ids at or above it are never sampled (the embedding's padding rows); default the
        tokenizer's vocabulary size when a tokenizer is given, else the model's (nothing masked): callers without
        a tokenizer should pass it (151,669 for Qwen3)."""
        if max_prefill_length > max_cache_length:
            raise ValueError(f"max_prefill_length {max_prefill_length} > max_cache_length {max_cache_length}")
        if valid_vocab_size is None and tokenizer is not None:
            # A tiny test model may have fewer rows than the real tokenizer has ids: it can only sample its own.
            valid_vocab_size = min(tokenizer.vocab_size, model.config.vocab_size)
        if valid_vocab_size is not None and not 0 < valid_vocab_size <= model.config.vocab_size:
            raise ValueError(f"valid_vocab_size {valid_vocab_size} outside [1, the model's vocab_size "
                             f"{model.config.vocab_size}] (a tokenizer larger than the embedding?)")
        self.valid_vocab_size = valid_vocab_size
        self._graphdef, self._params, self._rest = nnx.split(model, nnx.Param, ...)
        # Read once: after a donating train step the arrays here may be deleted before update_params runs.
        self._param_shardings = jax.tree.map(lambda a: getattr(a, "sharding", None), self._params)
        self._decode_layer_shardings = _decode_layer_shardings(nnx.to_pure_dict(self._params)["layers"])
        # The embedding table (and LM head, final norm), gathered once per decode call like the layer weights: left
        # FSDP-sharded, every decode step's lookup and logits moved floats between devices.
        self._decode_other_shardings = jax.tree_util.tree_map_with_path(
            lambda path, a: None if _is_layer_path(path) else _decode_sharding(a, False), self._params)
        self.config = model.config
        self._tokenizer = tokenizer
        self._slots = max_concurrent_decodes
        self._max_prefill = max_prefill_length
        self.max_cache_length = max_cache_length
        self.sampling = sampling
        self._cache_dtype = cache_dtype
        self._mesh = mesh or jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
        self._seed_counter = np.uint32(seed)
        self._stop_ids = jnp.asarray(stop_ids, jnp.int32)
        static = dict(top_k=sampling.top_k, use_top_p=sampling.top_p < 1.0)
        self._prefill_jit = jax.jit(functools.partial(self._prefill_impl, **static))
        self._extend_jit = jax.jit(functools.partial(self._extend_impl, **static), donate_argnums=(1,),
                                   static_argnames=("window",))
        self._generate_jit = jax.jit(functools.partial(self._generate_impl, **static), donate_argnums=(1,),
                                     static_argnames=("num_steps", "window"))
        self._insert_jit = jax.jit(self._insert_impl, donate_argnums=(1,))
        self._finish_jit = jax.jit(self._finish_impl, donate_argnums=(0,))
        self._init_jit = None

    # ------------------------------------------------------------------ params
    def load_params(self, *args, **kwargs):
        return self._params

    @property
    def params(self):
        return self._params

    def update_params(self, params) -> None:
        """Use the trainer's parameters in place: same device arrays unless this engine's placement differs."""
        ours = jax.tree.leaves(self._params)
        theirs = jax.tree.leaves(params)
        if len(ours) != len(theirs) or any(a.shape != b.shape for a, b in zip(ours, theirs)):
            raise ValueError("update_params: parameter tree does not match the engine's model")
        self._params = jax.tree.map(
            lambda p, s: p if s is None or getattr(p, "sharding", None) == s else jax.device_put(p, s),
            params, self._param_shardings)

    # ------------------------------------------------------------------ model pieces (traced)
    def _model(self, params):
        return nnx.merge(self._graphdef, params, self._rest)

    def _sample_at(self, model, hidden, seeds, positions, temperature, top_p, top_k, use_top_p):
        logits = model.logits_from_hidden(hidden)
        keys = sampling.token_keys(seeds, positions)
        return sampling.sample_rows(keys, logits, temperature=temperature, top_p=top_p, top_k=top_k,
                                    use_top_p=use_top_p, valid_vocab_size=self.valid_vocab_size)

    def _run_chunk(self, params, cache, tokens, true_length, seed, temperature, top_p, top_k, use_top_p):
        """Append tokens[1, T] (first true_length valid) to a one-row cache; sample the next token."""
        model = self._model(params)
        t = tokens.shape[1]
        start = cache.lengths[0]
        idx = jnp.arange(t, dtype=jnp.int32)
        positions = (start + idx)[None]
        segments = (idx < true_length).astype(jnp.int32)[None]
        hidden, cache = model.hidden_states(tokens.astype(jnp.int32), positions, segments, cache)
        last = jax.lax.dynamic_index_in_dim(hidden[0], true_length - 1, axis=0, keepdims=True)
        token, logprob = self._sample_at(model, last, seed[None], (start + true_length)[None], temperature[None],
                                         top_p[None], top_k, use_top_p)
        return cache, token, logprob

    # ------------------------------------------------------------------ JetStream API
    def _prefill_impl(self, params, existing, tokens, true_length, seed, temperature, top_p, *, top_k, use_top_p):
        t = tokens.shape[1]
        if existing is None:
            cache = kvc.KVCache.for_config(self.config, batch=1, max_len=t, dtype=self._cache_dtype)
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

    def prefill(self, *, params, existing_prefix=None, padded_tokens, true_length: int):
        padded_tokens = jnp.asarray(padded_tokens, jnp.int32)
        if padded_tokens.ndim == 1:
            padded_tokens = padded_tokens[None]
        if existing_prefix is not None:
            seed = existing_prefix["seed"][0]
            held = int(existing_prefix["cache"].max_len)
        else:
            seed = self._next_seed()
            held = 0
        if held + padded_tokens.shape[1] > self.max_cache_length:
            raise ValueError(f"prefix of {held} + {padded_tokens.shape[1]} tokens exceeds max_cache_length "
                             f"{self.max_cache_length}")
        s = self.sampling
        return self._prefill_jit(params, existing_prefix, padded_tokens, jnp.int32(true_length), jnp.uint32(seed),
                                 jnp.float32(s.temperature), jnp.float32(s.top_p))

    def _insert_impl(self, prefix, state: DecodeState, slot):
        src = prefix["cache"]
        pad = self.max_cache_length - src.max_len
        k_pad, v_pad = ((0, 0), (0, 0), (0, 0), (0, pad)), ((0, 0), (0, 0), (0, pad), (0, 0))
        row = kvc.KVCache(
            k=tuple(jnp.pad(k, k_pad) for k in src.k), v=tuple(jnp.pad(v, v_pad) for v in src.v),
            positions=jnp.pad(src.positions, ((0, 0), (0, pad))),
            segment_ids=jnp.pad(src.segment_ids, ((0, 0), (0, pad)), constant_values=PAD_SEGMENT),
            lengths=src.lengths)
        token = prefix["token"][0]
        return self._constrain_state(DecodeState(
            cache=kvc.insert_rows(state.cache, row, slot),
            tokens=state.tokens.at[slot].set(token),
            active=state.active.at[slot].set(~jnp.isin(token, self._stop_ids)),
            seeds=state.seeds.at[slot].set(prefix["seed"][0]),
            temperature=state.temperature.at[slot].set(self.sampling.temperature),
            top_p=state.top_p.at[slot].set(self.sampling.top_p),
            limits=state.limits.at[slot].set(self.max_cache_length)))

    def insert(self, prefix, decode_state: DecodeState, slot: int) -> DecodeState:
        if prefix["cache"].max_len > self.max_cache_length:
            raise ValueError(f"prefix of {prefix['cache'].max_len} tokens exceeds max_cache_length")
        return self._insert_jit(prefix, decode_state, jnp.int32(slot))

    def _decoding_params(self, params):
        """Params with every weight but the stacked layers cast to the compute dtype and gathered (see __init__)."""
        cdt = self._model(params).compute_dtype

        def gather(p, sharding):
            if sharding is None:
                return p
            p = p.astype(cdt) if jnp.issubdtype(p.dtype, jnp.floating) else p
            return jax.lax.with_sharding_constraint(p, sharding)

        return jax.tree.map(gather, params, self._decode_other_shardings,
                            is_leaf=lambda x: x is None or isinstance(x, jax.sharding.Sharding))

    def _generate_impl(self, params, state: DecodeState, *, num_steps: int, window: int | None = None, top_k,
                       use_top_p):
        model = self._model(self._decoding_params(params))
        window = state.cache.max_len if window is None else window
        layer_params = model.layers.per_layer(model.compute_dtype)  # sliced and cast once per call, not per step
        if self._decode_layer_shardings is not None:
            # Gathered here, once per call: left FSDP-sharded, every step all-gathers every layer's weights.
            layer_params = [{k: jax.lax.with_sharding_constraint(v, self._decode_layer_shardings[k])
                             for k, v in p.items()} for p in layer_params]

        def step(state, _):
            cache = state.cache
            positions = cache.lengths[:, None]
            active = state.active & (cache.lengths < state.limits)
            segments = active.astype(jnp.int32)[:, None]
            hidden, cache = model.hidden_states(state.tokens[:, None], positions, segments, cache,
                                                cache_window=window, layer_params=layer_params)
            token, logprob = self._sample_at(model, hidden[:, 0], state.seeds, positions[:, 0] + 1,
                                             state.temperature, state.top_p, top_k, use_top_p)
            token = jnp.where(active, token, state.tokens)
            still = active & ~jnp.isin(token, self._stop_ids) & (cache.lengths < state.limits)
            new = self._constrain_state(dataclasses.replace(state, cache=cache, tokens=token, active=still))
            return new, (token, logprob, active, cache.lengths)

        state, (tokens, logprobs, valid, lengths) = jax.lax.scan(step, self._constrain_state(state), None,
                                                                 length=num_steps)
        return state, tokens, logprobs, valid, lengths

    def generate_steps(self, params, decode_state: DecodeState, num_steps: int, *, context_bound: int | None = None):
        """`num_steps` decode steps in one call -> (state, tokens, logprobs, valid, lengths), each [num_steps, B].

        A slot stops (valid False afterwards) when it samples a stop id or its cache reaches its limit.
        `context_bound` >= every active slot's cache length + num_steps lets attention read only that much of the
        cache (rounded up to a power of two); a bound below a slot's length is a ValueError (checked on the host
        before anything runs, so the state is kept).
        """
        window = self._window(context_bound)
        if window < self.max_cache_length:
            active = np.asarray(decode_state.active)
            held = int(np.max(np.asarray(decode_state.cache.lengths)[active], initial=0))
            if active.any() and held + num_steps > window:
                raise ValueError(f"generate_steps: context_bound {context_bound} is below a slot's cache length "
                                 f"{held} + {num_steps} steps")
        return self._generate_jit(params, decode_state, num_steps=num_steps, window=window)

    def _window(self, context_bound: int | None) -> int:
        """Cache slots attention reads for a context bound: a power of two (few compiled variants) or all."""
        if context_bound is None:
            return self.max_cache_length
        return min(max(extend_batch.pow2_at_least(context_bound), MIN_CACHE_WINDOW), self.max_cache_length)

    @property
    def generate_function(self):
        """The jitted multi-step decode (`num_steps` static), e.g. for HLO dumps."""
        return self._generate_jit

    def generate(self, params, decode_state: DecodeState):
        state, tokens, logprobs, valid, lengths = self._generate_jit(params, decode_state, num_steps=1)
        # The log-prob rides along as a fourth column (JetStream's orchestrator ignores it; `unpack_logprobs`).
        return state, pack_result_tokens(tokens[0], valid[0], lengths[0], logprob_column(logprobs[0]))

    def _empty_decode_state(self) -> DecodeState:
        b = self._slots
        cache = kvc.KVCache.for_config(self.config, batch=b, max_len=self.max_cache_length, dtype=self._cache_dtype)
        return DecodeState(cache=cache, tokens=jnp.zeros((b,), jnp.int32), active=jnp.zeros((b,), bool),
                           seeds=jnp.zeros((b,), jnp.uint32), temperature=jnp.ones((b,), jnp.float32),
                           top_p=jnp.ones((b,), jnp.float32), limits=jnp.zeros((b,), jnp.int32))

    def init_decode_state(self, *args, **kwargs) -> DecodeState:
        # Compiled with its output shardings, so every device allocates only its share of the cache (stage 2's
        # cache is ~350 GB in all) and the zeros are made in one call instead of one eager op per buffer.
        if self._init_jit is None:
            shardings = self._decode_state_shardings(jax.eval_shape(self._empty_decode_state))
            self._init_jit = jax.jit(self._empty_decode_state, out_shardings=shardings)
        return self._init_jit()

    def _slot_axes(self, rows: int) -> tuple[str, ...]:
        """Mesh axes (of SLOT_AXES, in order) that `rows` split over: each taken while the product still divides."""
        axes, size = [], 1
        for a in SLOT_AXES:
            n = self._mesh.shape.get(a, 1)
            if n > 1 and rows % (size * n) == 0:
                axes.append(a)
                size *= n
        return tuple(axes)

    def _decode_state_shardings(self, state: DecodeState):
        """Slots split over every slot axis that divides them (the KV cache dominates rollout memory: replicated
        over `sequence`, stage 2 held 162 GiB of it per device), KV heads over `tensor` when it divides them;
        always on the same devices as the parameters."""
        mesh = self._mesh
        slots = self._slot_axes(self._slots) or None
        tensor = mesh.shape.get("tensor", 1)
        heads = "tensor" if tensor > 1 and self.config.num_kv_heads % tensor == 0 else None
        P = jax.sharding.PartitionSpec

        def spec(*entries):
            return jax.sharding.NamedSharding(mesh, P(*entries))

        cache = state.cache
        cache_spec = kvc.KVCache(k=tuple(spec(slots, heads) for _ in cache.k), v=tuple(spec(slots, heads) for _ in
                                                                                      cache.v),
                                 positions=spec(slots), segment_ids=spec(slots), lengths=spec(slots))
        return DecodeState(cache=cache_spec, tokens=spec(slots), active=spec(slots), seeds=spec(slots),
                           temperature=spec(slots), top_p=spec(slots), limits=spec(slots))

    def decode_state_shardings(self) -> DecodeState:
        return self._decode_state_shardings(jax.eval_shape(self._empty_decode_state))

    def _constrain_state(self, state: DecodeState) -> DecodeState:
        if self._mesh.size == 1:
            return state
        return jax.lax.with_sharding_constraint(state, self._decode_state_shardings(state))

    def _row_sharding(self, rows: int):
        """NamedSharding of an extend's [rows, ...] arrays: rows over the slot axes that divide them."""
        return jax.sharding.NamedSharding(self._mesh, jax.sharding.PartitionSpec(self._slot_axes(rows) or None))

    # ------------------------------------------------------------------ ahead-of-time compilation
    def compile_targets(self, abstract_params=None, *, prefill_tokens_per_call: int | None = None,
                        max_prefill_rows: int = 16, decode_steps: int = 8) -> dict:
        """The engine's jitted pieces at their largest shapes, for a fit check: {name: (jitted, abstract_args,
        static_kwargs)}, compiled as `jitted.trace(*abstract_args, **static_kwargs).lower().compile()`.

        - "decode_state": the decode state's allocation (no arguments).
        - "extend_<rows>x<tokens>": the largest calls the scheduler can send under `prefill_tokens_per_call`
          (default `max_prefill_length`) with at most `max_prefill_rows` slots a call (`extend_batch.largest_calls`),
          attending over the whole cache (a slot deep in its episode).
        - "decode_loop": `decode_steps` decode steps over the whole cache.
        `abstract_params`: ShapeDtypeStructs with shardings (default: this engine's own parameters' shapes).
        """
        params = self._params if abstract_params is None else abstract_params
        params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)),
                              params)
        shardings = self.decode_state_shardings()
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             jax.eval_shape(self._empty_decode_state), shardings)
        full = dict(window=self.max_cache_length)
        out = {"decode_state": (jax.jit(self._empty_decode_state, out_shardings=shardings), (), {})}
        for rows, tokens, outputs in extend_batch.largest_calls(prefill_tokens_per_call or self._max_prefill,
                                                                self._max_prefill, min(max_prefill_rows, self._slots)):
            host = extend_batch.abstract_call(rows, tokens, outputs, num_slots=self._slots,
                                              max_prefill=self._max_prefill, max_cache_length=self.max_cache_length,
                                              sampling=self.sampling)
            out[f"extend_{rows}x{tokens}"] = (self._extend_jit, (params, state, *host), full)
        out["decode_loop"] = (self._generate_jit, (params, state), dict(num_steps=decode_steps, **full))
        return out

    # ------------------------------------------------------------------ driver fast path
    def _extend_impl(self, params, state: DecodeState, slots, sources, base_slots, tokens, true_lengths, resets,
                     seeds, temperature, top_p, limits, *, window, top_k, use_top_p):
        """Prefill u computed rows and fan them out to n slots (a GRPO group's shared prompt is computed once).

        Computed row r extends slot base_slots[r]'s history (none when resets[r]) with tokens[r, :true_lengths[r]];
        output row i (slot slots[i]) takes computed row sources[i] and samples its own first token with its own
        seed. Padding rows point at slot B: gathered empty, dropped on the way back. A continuing output row's slot
        is its computed row's base slot (`extend_batch.pack`), so every slot gets its new tokens written at its own
        fill level; a fresh slot is emptied first.
        """
        model = self._model(params)
        cache = self._constrain_state(state).cache
        u, t = tokens.shape
        rows = self._row_sharding(u)

        def split(x):  # computed rows stay split over the slot axes: no device computes (or holds) all of them
            return jax.lax.with_sharding_constraint(x, rows) if self._mesh.size > 1 else x

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
        token, logprob = self._sample_at(model, jnp.take(last, sources, axis=0), seeds, lengths,
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
            active=put_slots(state.active, ~jnp.isin(token, self._stop_ids) & (lengths < limits)),
            seeds=put_slots(state.seeds, seeds), temperature=put_slots(state.temperature, temperature),
            top_p=put_slots(state.top_p, top_p), limits=put_slots(state.limits, limits))
        return self._constrain_state(state), token, logprob, lengths

    def extend_slots(self, params, decode_state: DecodeState, requests: list[ExtendRequest], *,
                     context_bound: int | None = None):
        """Prefill several slots in one call: each request's tokens go on top of its slot's cached history (or a
        fresh history when `reset`), then one token is sampled per slot.

        Fresh requests with identical tokens (the samples of one GRPO group) share one computed row. Computed rows,
        output rows and tokens are padded to buckets to bound recompiles; `prefill_cost` tells a caller what a
        batch will compute. `context_bound` >= every requested slot's cache length after the call lets attention
        read only that much of the cache (when every request is a reset the engine knows it itself); a bound below
        a slot's length is a ValueError before anything runs. Returns (state, tokens [n], logprobs [n], cache
        lengths [n]) in request order; a sampled token is not yet in the cache (the next decode step feeds it).
        """
        batch = extend_batch.pack(requests, num_slots=self._slots, max_prefill=self._max_prefill,
                                  max_cache_length=self.max_cache_length, sampling=self.sampling)
        if context_bound is None and all(r.reset for r in requests):
            context_bound = batch.longest
        window = self._window(context_bound)
        continuing = [r for r in requests if not r.reset]
        if window < self.max_cache_length and continuing:
            held = np.asarray(decode_state.cache.lengths)
            need = max(int(held[r.slot]) + len(r.tokens) for r in continuing)
            if need > window:
                raise ValueError(f"extend_slots: context_bound {context_bound} is below a slot's cache length {need}")
        n = len(requests)
        state, token, logprob, lengths = self._extend_jit(
            self._params if params is None else params, decode_state, *map(jnp.asarray, batch.arrays()), window=window)
        return state, token[:n], logprob[:n], lengths[:n]

    def prefill_cost(self, requests: list[ExtendRequest]) -> int:
        """Padded tokens that `extend_slots(requests)` computes (shared prompts once), for batching decisions."""
        return extend_batch.prefill_cost(requests, self._max_prefill)

    def extend_slot(self, params, decode_state: DecodeState, slot: int, tokens, *, reset: bool, seed: int = 0,
                    limit: int | None = None, sampling_settings: SamplingSettings | None = None,
                    context_bound: int | None = None):
        """One-slot `extend_slots`: returns (state, token, logprob, cache_length) as scalars.

        `limit` caps the slot's cache length for the message about to be generated.
        """
        state, token, logprob, length = self.extend_slots(
            params, decode_state, [ExtendRequest(slot, tokens, reset=reset, seed=seed, limit=limit,
                                                 sampling=sampling_settings)], context_bound=context_bound)
        return state, token[0], logprob[0], length[0]

    def _finish_impl(self, state: DecodeState, slot, length):
        """Stop a slot and cut its cache back to `length` tokens (drops tokens decoded past a stop)."""
        c = state.cache
        keep = jnp.arange(c.max_len) < length
        segs = c.segment_ids.at[slot].set(jnp.where(keep, c.segment_ids[slot], PAD_SEGMENT))
        cache = dataclasses.replace(c, segment_ids=segs, lengths=c.lengths.at[slot].set(length))
        return self._constrain_state(dataclasses.replace(state, cache=cache,
                                                         active=state.active.at[slot].set(False)))

    def finish_slot(self, decode_state: DecodeState, slot: int, length: int) -> DecodeState:
        return self._finish_jit(decode_state, jnp.int32(slot), jnp.int32(length))

    def _next_seed(self) -> np.uint32:
        self._seed_counter = np.uint32(self._seed_counter + 1)
        return self._seed_counter

    # ------------------------------------------------------------------ the rest of the interface
    def get_prefix_destination_sharding(self) -> Any:
        replicated = jax.sharding.NamedSharding(self._mesh, jax.sharding.PartitionSpec())
        return {"cache": replicated, "token": replicated, "logprob": replicated, "seed": replicated}

    def get_tokenizer(self):
        from jetstream.engine import tokenizer_pb2
        return tokenizer_pb2.TokenizerParameters(path=getattr(self._tokenizer, "source_dir", ""))

    def build_tokenizer(self, metadata=None) -> tokenizer_api.Tokenizer:
        if self._tokenizer is None:
            raise ValueError("this engine was built without a tokenizer")
        return QwenJetStreamTokenizer(self._tokenizer)

    @property
    def max_concurrent_decodes(self) -> int:
        return self._slots

    @property
    def samples_per_slot(self) -> int:
        return 1

    @property
    def max_prefill_length(self) -> int:
        return self._max_prefill

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self._mesh

    @property
    def colocated_cpus(self):
        return None
