"""Host side of a multi-slot prefill: requests -> the padded arrays one `Qwen3Engine.extend_slots` call computes.

Shapes are bucketed (prefill length, computed rows, output rows) so few variants compile. Fresh requests with
identical tokens, the samples of one GRPO group starting together, share one computed row.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# Chat deltas (tool results, the next user turn) are mostly under 128 tokens: one bucket for all of them instead of
# 16/32/64/128 spares a compiled prefill variant per bucket and row count (~3 s each on the CPU demo, minutes for
# a 4B model), while the padding costs at most 127 tokens of a row that attends over thousands of cached ones.
MIN_PREFILL_BUCKET = 128
LINEAR_BUCKET_STEP = 1024


@dataclasses.dataclass(frozen=True)
class ExtendRequest:
    """Tokens to prefill into one slot (see `Qwen3Engine.extend_slots`)."""

    slot: int
    tokens: Any  # sequence of int token ids
    reset: bool = False  # start the slot's history afresh (a new episode)
    seed: int = 0  # sampling seed of a fresh episode (a continuing slot keeps its own)
    limit: int | None = None  # cap on the slot's cache length for the message about to be generated
    sampling: Any = None  # SamplingSettings for this slot, or None for the engine's


@dataclasses.dataclass(frozen=True)
class ExtendBatch:
    """Arrays of one call: U computed rows (tokens, their base slots) fanned out to N output rows (slots).

    Padding rows point at slot `num_slots`: gathered empty and dropped on the way back.
    """

    slots: np.ndarray         # [N] output slot of each row
    sources: np.ndarray       # [N] computed row each output row takes
    base_slots: np.ndarray    # [U] slot whose cache a computed row extends
    tokens: np.ndarray        # [U, T] padded tokens
    true_lengths: np.ndarray  # [U]
    resets: np.ndarray        # [U] start the computed row's history afresh
    seeds: np.ndarray         # [N]
    temperature: np.ndarray   # [N]
    top_p: np.ndarray         # [N]
    limits: np.ndarray        # [N]
    longest: int              # longest request (tokens)

    def arrays(self) -> tuple[np.ndarray, ...]:
        return (self.slots, self.sources, self.base_slots, self.tokens, self.true_lengths, self.resets, self.seeds,
                self.temperature, self.top_p, self.limits)


def prefill_bucket(length: int, max_length: int) -> int:
    """Padded prefill length: powers of two up to LINEAR_BUCKET_STEP, then multiples of it.

    Bounds the number of prefill compilations while wasting at most LINEAR_BUCKET_STEP tokens on the long BFCL
    prompts (2k-5k tokens with tools), where doubling would waste up to half the work.
    """
    if length > max_length:
        raise ValueError(f"prefill of {length} tokens exceeds max_prefill_length {max_length}")
    bucket = MIN_PREFILL_BUCKET
    while bucket < length and bucket < LINEAR_BUCKET_STEP:
        bucket *= 2
    if bucket < length:
        bucket = -(-length // LINEAR_BUCKET_STEP) * LINEAR_BUCKET_STEP
    return min(bucket, max_length)


def pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _share_key(request: ExtendRequest):
    return np.asarray(request.tokens, np.int32).tobytes() if request.reset else ("slot", request.slot)


def prefill_cost(requests: list[ExtendRequest], max_prefill: int) -> int:
    """Padded tokens one call on `requests` computes (shared prompts once), for batching decisions."""
    unique = {_share_key(r) for r in requests}
    return pow2_at_least(len(unique)) * prefill_bucket(max(len(r.tokens) for r in requests), max_prefill)


def pack(requests: list[ExtendRequest], *, num_slots: int, max_prefill: int, max_cache_length: int,
         sampling) -> ExtendBatch:
    """Validate the requests and lay them out (`sampling`: the engine's SamplingSettings)."""
    if not requests:
        raise ValueError("extend_slots needs at least one request")
    if len({r.slot for r in requests}) != len(requests):
        raise ValueError("extend_slots: a slot appears twice")
    computed: list[ExtendRequest] = []
    index: dict[Any, int] = {}
    sources = []
    for r in requests:
        if not 0 <= r.slot < num_slots:
            raise ValueError(f"slot {r.slot} outside [0, {num_slots})")
        if len(r.tokens) == 0:
            raise ValueError(f"extend_slots needs at least one token per request (slot {r.slot})")
        rs = r.sampling or sampling
        if rs.top_k != sampling.top_k or (rs.top_p < 1.0) != (sampling.top_p < 1.0):
            raise ValueError("per-slot sampling may change temperature and top_p, not top_k or top-p on/off")
        key = _share_key(r)
        if key not in index:
            index[key] = len(computed)
            computed.append(r)
        sources.append(index[key])
    longest = max(len(r.tokens) for r in computed)
    u, n = pow2_at_least(len(computed)), pow2_at_least(len(requests))
    tokens = np.zeros((u, prefill_bucket(longest, max_prefill)), np.int32)
    true_lengths = np.zeros(u, np.int32)
    base_slots = np.full(u, num_slots, np.int32)
    resets = np.ones(u, bool)
    for i, r in enumerate(computed):
        tokens[i, :len(r.tokens)] = r.tokens
        true_lengths[i], base_slots[i], resets[i] = len(r.tokens), r.slot, r.reset
    slots = np.full(n, num_slots, np.int32)
    source = np.zeros(n, np.int32)
    seeds = np.zeros(n, np.uint32)
    temperature = np.full(n, sampling.temperature, np.float32)
    top_p = np.full(n, sampling.top_p, np.float32)
    limits = np.full(n, max_cache_length, np.int32)
    for i, r in enumerate(requests):
        rs = r.sampling or sampling
        slots[i], source[i], seeds[i] = r.slot, sources[i], r.seed
        temperature[i], top_p[i] = rs.temperature, rs.top_p
        if r.limit is not None:
            limits[i] = min(r.limit, max_cache_length)
    return ExtendBatch(slots, source, base_slots, tokens, true_lengths, resets, seeds, temperature, top_p, limits,
                       longest)


def largest_calls(prefill_tokens_per_call: int, max_prefill: int, max_rows: int) -> list[tuple[int, int, int]]:
    """(computed rows, padded tokens, output rows) of the largest prefill calls the scheduler can make: it packs
    requests until `prefill_cost` would pass the budget, at most `max_rows` slots a call, and sends a request over
    the budget alone. The two extremes: one prompt of the longest bucket (a GRPO group starting, fanned out to its
    slots when the budget holds it: the longest attention per row) and as many distinct rows as the budget holds
    (at most `max_rows`, halved until they fit), of the budget's share each (slots resuming after tool results:
    the most cache rows gathered)."""
    shapes = [(1, max_prefill, max_rows if prefill_tokens_per_call >= max_prefill else 1)]
    # Distinct rows are bounded by the budget too: each costs at least the smallest bucket.
    rows, smallest = max_rows, min(MIN_PREFILL_BUCKET, max_prefill)
    while rows > 1 and rows * smallest > prefill_tokens_per_call:
        rows //= 2
    if rows > 1:
        shapes.append((rows, _largest_bucket_at_most(prefill_tokens_per_call // rows, max_prefill), rows))
    return shapes


def _largest_bucket_at_most(tokens: int, max_prefill: int) -> int:
    """The longest padded prefill length (`prefill_bucket`'s buckets) of at most `tokens`."""
    if tokens >= max_prefill:
        return max_prefill
    if tokens >= LINEAR_BUCKET_STEP:
        return tokens // LINEAR_BUCKET_STEP * LINEAR_BUCKET_STEP
    return max(MIN_PREFILL_BUCKET, 1 << (tokens.bit_length() - 1))


def abstract_call(rows: int, tokens: int, outputs: int, *, num_slots: int, max_prefill: int,
                  max_cache_length: int, sampling) -> tuple:
    """ShapeDtypeStructs of one `pack`ed call of that shape, laid out by `pack` itself (for compile-only checks)."""
    import jax

    requests = [ExtendRequest(slot=i, tokens=np.full(tokens, i % rows + 1, np.int32), reset=True, seed=i)
                for i in range(outputs)]  # identical tokens within a row's group: pack shares those rows
    batch = pack(requests, num_slots=num_slots, max_prefill=max_prefill, max_cache_length=max_cache_length,
                 sampling=sampling)
    if batch.tokens.shape != (rows, tokens):
        raise AssertionError(f"extend bucket {rows}x{tokens} packed as {batch.tokens.shape}")
    return tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in batch.arrays())

