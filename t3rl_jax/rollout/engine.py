"""Qwen3Engine: JetStream's `Engine` interface over our Flax Qwen3 with a slot-based KV cache; ties the decode state
(`decode_state.py`), the traced kernels (`engine_kernels.py`, `engine_extend.py`) and their jitted forms together.

Two ways in:
- JetStream's own API (`prefill` -> `insert` -> `generate`), used by JetStream's orchestrator and gRPC server
  (`scripts/serve.py`). `prefill` accepts an `existing_prefix` and extends it without recomputing it.
- The rollout backend (`rollout/backend.py`): `extend_slots` appends tokens to slots' *own* caches in place, several
  slots per call, and `generate_steps` runs several decode steps in one jitted call, attending over only as much of
  the cache as the caller says the slots hold.

`compile_targets` hands the jitted pieces and their abstract arguments to the fit check.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t3rl_jax.rollout import engine_extend, extend_batch
from t3rl_jax.rollout.decode_state import SLOT_AXES, DecodeLayout, DecodeState, SamplingSettings  # noqa: F401
from t3rl_jax.rollout.engine_kernels import EngineKernels, decode_weight_shardings
from t3rl_jax.rollout.extend_batch import ExtendRequest
from t3rl_jax.rollout.jetstream_api import (QwenJetStreamTokenizer, engine_api, logprob_column, pack_result_tokens,
                                            tokenizer_api)

MIN_CACHE_WINDOW = 16  # smallest attention window over the cache (powers of two above it bound recompiles)

__all__ = ["Qwen3Engine", "context_bound_of", "SamplingSettings", "DecodeState", "ExtendRequest", "MIN_CACHE_WINDOW",
           "SLOT_AXES"]


def context_bound_of(context_bound) -> int | None:
    """A backend's `context_bound`: None, one int for every slot, or {slot: bound} (the largest counts here)."""
    if isinstance(context_bound, dict):
        return max(context_bound.values(), default=None)
    return context_bound


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
        graphdef, self._params, rest = nnx.split(model, nnx.Param, ...)
        # Read once: after a donating train step the arrays here may be deleted before update_params runs.
        self._param_shardings = jax.tree.map(lambda a: getattr(a, "sharding", None), self._params)
        self.config = model.config
        self._tokenizer = tokenizer
        self._slots = max_concurrent_decodes
        self._max_prefill = max_prefill_length
        self.max_cache_length = max_cache_length
        self.sampling = sampling
        self._mesh = mesh or jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
        self._seed_counter = np.uint32(seed)
        self.layout = DecodeLayout(model.config, self._mesh, max_concurrent_decodes, max_cache_length, cache_dtype)
        layer_shardings, other_shardings = decode_weight_shardings(self._params)
        self.kernels = k = EngineKernels(graphdef, rest, self.layout, jnp.asarray(stop_ids, jnp.int32),
                                         valid_vocab_size, sampling, layer_shardings, other_shardings)
        static = dict(top_k=sampling.top_k, use_top_p=sampling.top_p < 1.0)
        self._prefill_jit = jax.jit(functools.partial(k.prefill, **static))
        self._extend_jit = jax.jit(functools.partial(engine_extend.extend, k, **static), donate_argnums=(1,),
                                   static_argnames=("window",))
        self._generate_jit = jax.jit(functools.partial(k.generate, **static), donate_argnums=(1,),
                                     static_argnames=("num_steps", "window"))
        self._insert_jit = jax.jit(k.insert, donate_argnums=(1,))
        self._finish_jit = jax.jit(k.finish, donate_argnums=(0,))
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

    # ------------------------------------------------------------------ JetStream API
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

    def insert(self, prefix, decode_state: DecodeState, slot: int) -> DecodeState:
        if prefix["cache"].max_len > self.max_cache_length:
            raise ValueError(f"prefix of {prefix['cache'].max_len} tokens exceeds max_cache_length")
        return self._insert_jit(prefix, decode_state, jnp.int32(slot))

    def generate(self, params, decode_state: DecodeState):
        state, tokens, logprobs, valid, lengths = self._generate_jit(params, decode_state, num_steps=1)
        # The log-prob rides along as a fourth column (JetStream's orchestrator ignores it; `unpack_logprobs`).
        return state, pack_result_tokens(tokens[0], valid[0], lengths[0], logprob_column(logprobs[0]))

    @property
    def generate_function(self):
        """The jitted multi-step decode (`num_steps` static), e.g. for HLO dumps."""
        return self._generate_jit

    def init_decode_state(self, *args, **kwargs) -> DecodeState:
        # Compiled with its output shardings, so every device allocates only its share of the cache (stage 2's
        # cache is ~350 GB in all) and the zeros are made in one call instead of one eager op per buffer.
        if self._init_jit is None:
            self._init_jit = jax.jit(self.layout.empty, out_shardings=self.layout.shardings())
        return self._init_jit()

    def decode_state_shardings(self) -> DecodeState:
        return self.layout.shardings()

    # ------------------------------------------------------------------ rollout backend
    @property
    def slot_classes(self) -> tuple[tuple[int, int], ...]:
        """(slots, cache length) of each slot class: one here (`slot_classes.SlotClassBackend` composes several)."""
        return ((self._slots, self.max_cache_length),)

    def slot_capacity(self, slot: int) -> int:
        return self.max_cache_length

    def extend_slots(self, params, decode_state: DecodeState, requests: list[ExtendRequest], *,
                     context_bound=None):
        """Prefill several slots in one call: each request's tokens go on top of its slot's cached history (or a
        fresh history when `reset`), then one token is sampled per slot.

        Fresh requests with identical tokens (the samples of one GRPO group) share one computed row. Computed rows,
        output rows and tokens are padded to buckets to bound recompiles; `prefill_cost` tells a caller what a
        batch will compute. `context_bound` >= every requested slot's cache length after the call lets attention
        read only that much of the cache (when every request is a reset the engine knows it itself); a bound below
        a slot's length is a ValueError before anything runs. Returns (state, tokens [n], logprobs [n], cache
        lengths [n]) in request order; a sampled token is not yet in the cache (the next decode step feeds it).
        A {slot: bound} mapping bounds by its largest value.
        """
        context_bound = context_bound_of(context_bound)
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

    def generate_steps(self, params, decode_state: DecodeState, num_steps: int, *, context_bound=None):
        """`num_steps` decode steps in one call -> (state, tokens, logprobs, valid, lengths), each [num_steps, B].

        A slot stops (valid False afterwards) when it samples a stop id or its cache reaches its limit.
        `context_bound` >= every active slot's cache length + num_steps lets attention read only that much of the
        cache (rounded up to a power of two); a bound below a slot's length is a ValueError (checked on the host
        before anything runs, so the state is kept). A {slot: bound} mapping bounds by its largest value.
        """
        context_bound = context_bound_of(context_bound)
        window = self._window(context_bound)
        if window < self.max_cache_length:
            active = np.asarray(decode_state.active)
            held = int(np.max(np.asarray(decode_state.cache.lengths)[active], initial=0))
            if active.any() and held + num_steps > window:
                raise ValueError(f"generate_steps: context_bound {context_bound} is below a slot's cache length "
                                 f"{held} + {num_steps} steps")
        return self._generate_jit(params, decode_state, num_steps=num_steps, window=window)

    def finish_slot(self, decode_state: DecodeState, slot: int, length: int) -> DecodeState:
        return self._finish_jit(decode_state, jnp.int32(slot), jnp.int32(length))

    def _window(self, context_bound: int | None) -> int:
        """Cache slots attention reads for a context bound: a power of two (few compiled variants) or all."""
        if context_bound is None:
            return self.max_cache_length
        return min(max(extend_batch.pow2_at_least(context_bound), MIN_CACHE_WINDOW), self.max_cache_length)

    def _next_seed(self) -> np.uint32:
        self._seed_counter = np.uint32(self._seed_counter + 1)
        return self._seed_counter

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
        state = self.layout.abstract()
        full = dict(window=self.max_cache_length)
        out = {"decode_state": (jax.jit(self.layout.empty, out_shardings=self.layout.shardings()), (), {})}
        for rows, tokens, outputs in extend_batch.largest_calls(prefill_tokens_per_call or self._max_prefill,
                                                                self._max_prefill, min(max_prefill_rows, self._slots)):
            host = extend_batch.abstract_call(rows, tokens, outputs, num_slots=self._slots,
                                              max_prefill=self._max_prefill, max_cache_length=self.max_cache_length,
                                              sampling=self.sampling)
            out[f"extend_{rows}x{tokens}"] = (self._extend_jit, (params, state, *host), full)
        out["decode_loop"] = (self._generate_jit, (params, state), dict(num_steps=decode_steps, **full))
        return out

    # ------------------------------------------------------------------ the rest of JetStream's interface
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
