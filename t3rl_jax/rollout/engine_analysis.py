"""The rollout engine's jitted functions on abstract arguments, at the shapes a rollout can reach: the decode-state
allocation, the multi-slot prefill (`extend_slots`) at its largest buckets over the whole cache, and the decode
loop. For the fit check (`step_analysis.run_functions`); nothing is allocated.

Built from the engine's own jitted attributes (`_empty_decode_state`, `_decode_state_shardings`, `_extend_jit`,
`_generate_jit`) and the host-side bucketing of `extend_batch.pack`, so what compiles here is what the driver runs;
an engine that offers `compile_targets()` itself is asked instead.
"""

from __future__ import annotations

import jax
import numpy as np

from t3rl_jax.rollout import extend_batch
from t3rl_jax.rollout.driver import MAX_PREFILL_ROWS, RolloutLimits
from t3rl_jax.rollout.extend_batch import ExtendRequest


class _AbstractArray(jax.ShapeDtypeStruct):
    """A ShapeDtypeStruct that answers `x[...]` with itself: the engine's constructor reads its weights' shapes
    and shardings through `variable[...]`, which a plain ShapeDtypeStruct does not support."""

    def __getitem__(self, index):
        if index is not Ellipsis:
            raise TypeError(f"abstract parameter indexed with {index!r}; only [...] is supported")
        return self


def constructor_params(abstract_params):
    """Abstract params an engine can be built from (`make_engine(constructor_params(params))`); the compiled
    functions are then traced with the plain abstract params."""
    return jax.tree.map(lambda a: _AbstractArray(a.shape, a.dtype, sharding=a.sharding), abstract_params)


def abstract_decode_state(engine):
    """The engine's decode state as ShapeDtypeStructs carrying the shardings `init_decode_state` allocates."""
    shapes = jax.eval_shape(engine._empty_decode_state)
    shardings = engine._decode_state_shardings(shapes)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


def extend_shapes(prefill_tokens_per_call: int, max_prefill: int, max_rows: int = MAX_PREFILL_ROWS):
    """(computed rows, padded tokens, output rows) of the largest prefill calls the driver makes: it packs requests
    until `prefill_cost` (computed rows rounded up to a power of two x the token bucket) would pass the budget, at
    most `max_rows` slots a call, and sends a request over the budget alone. The two extremes: one prompt of the
    longest bucket (a GRPO group starting, fanned out to its slots when the budget holds it), and `max_rows`
    distinct rows of the budget's share each (slots resuming after tool results) - the first is the longest
    attention per row, the second gathers the most cache rows."""
    shapes = [(1, max_prefill, max_rows if prefill_tokens_per_call >= max_prefill else 1)]
    if max_rows > 1:
        shapes.append((max_rows, _largest_bucket_at_most(prefill_tokens_per_call // max_rows, max_prefill),
                       max_rows))
    return shapes


def _largest_bucket_at_most(tokens: int, max_prefill: int) -> int:
    """The longest padded prefill length (`extend_batch.prefill_bucket`'s buckets) of at most `tokens`."""
    if tokens >= max_prefill:
        return max_prefill
    if tokens >= extend_batch.LINEAR_BUCKET_STEP:
        return tokens // extend_batch.LINEAR_BUCKET_STEP * extend_batch.LINEAR_BUCKET_STEP
    return max(extend_batch.MIN_PREFILL_BUCKET, 1 << (tokens.bit_length() - 1))


def _extend_args(engine, rows: int, tokens: int, outputs: int):
    """Abstract host arrays of one `extend_slots` call, laid out by the engine's own `extend_batch.pack`."""
    requests = []
    for i in range(outputs):
        # Distinct token values per computed row, identical within a row's group: `pack` shares those rows.
        row = i % rows
        requests.append(ExtendRequest(slot=i, tokens=np.full(tokens, row + 1, np.int32), reset=True, seed=i))
    batch = extend_batch.pack(requests, num_slots=engine.max_concurrent_decodes, max_prefill=engine.max_prefill_length,
                              max_cache_length=engine.max_cache_length, sampling=engine.sampling)
    if batch.tokens.shape != (rows, tokens):
        raise AssertionError(f"extend bucket {rows}x{tokens} packed as {batch.tokens.shape}")
    return tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in batch.arrays())


def compile_targets(engine, params, *, prefill_tokens_per_call: int, max_rows: int = MAX_PREFILL_ROWS) -> dict:
    """{name: (jitted, abstract args, static kwargs, resident state it reads or allocates)} for the engine's functions a rollout runs:
    "decode_state" (allocation), "extend_<rows>x<tokens>" (largest prefill buckets, attending over the whole
    cache: a slot deep in its episode), "decode_loop" (`RolloutLimits.decode_steps_per_call` steps, whole cache).
    `params`: the abstract parameters the functions are traced with.
    """
    if hasattr(engine, "compile_targets"):
        out = {}
        for name, (jitted, args, kwargs) in engine.compile_targets().items():
            out[name] = (jitted, args, kwargs, tuple(args[:2]))
        out["decode_state"] = out["decode_state"][:3] + ((out["decode_loop"][1][1],),)
        return out
    state = abstract_decode_state(engine)
    shardings = jax.tree.map(lambda a: a.sharding, state)
    allocate = jax.jit(engine._empty_decode_state, out_shardings=shardings)
    window = engine.max_cache_length
    out = {"decode_state": (allocate, (), {}, (state,))}  # its output is the resident state
    for rows, tokens, outputs in extend_shapes(prefill_tokens_per_call, engine.max_prefill_length,
                                               min(max_rows, engine.max_concurrent_decodes)):
        out[f"extend_{rows}x{tokens}"] = (engine._extend_jit, (params, state) + _extend_args(engine, rows, tokens,
                                                                                             outputs),
                                          {"window": window}, (params, state))
    out["decode_loop"] = (engine._generate_jit, (params, state),
                          {"num_steps": RolloutLimits.decode_steps_per_call, "window": window}, (params, state))
    return out
