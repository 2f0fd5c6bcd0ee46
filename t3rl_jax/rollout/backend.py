"""The slot-level rollout backend: what the episode scheduler needs of an inference engine, and nothing more.

A backend holds `max_concurrent_decodes` slots, each a growing token history with its own KV cache. The scheduler
extends slots with tokens (a fresh prompt, or an observation on top of the slot's history), runs decode steps over
all active slots at once, and cuts a slot back when a reply is finished. The state is a value the caller threads
through (calls donate it and return the new one). `Qwen3Engine` (`rollout/engine.py`) implements this with one slot
class; `SlotClassBackend` (`rollout/slot_classes.py`) with several classes by cache length (global slot ids, class
by class, smallest cache first), which also moves an episode into a larger class (`move_slot`). JetStream's own prefill/insert/generate interface sits beside it for serving
(`rollout/jetstream_api.py`).

Sampling contract: the token a slot samples at position p depends only on (the slot's episode seed, p), and the
log-prob returned with it is that of the distribution it was drawn from (temperature-scaled, top-k/top-p truncated
and renormalised, padded vocabulary ids excluded).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from t3rl_jax.rollout.extend_batch import ExtendRequest


@runtime_checkable
class RolloutBackend(Protocol):
    @property
    def max_concurrent_decodes(self) -> int:
        """Slots in a decode state."""

    @property
    def slot_classes(self) -> tuple[tuple[int, int], ...]:
        """(slots, cache length) per slot class, in global slot order, cache lengths increasing."""

    def slot_capacity(self, slot: int) -> int:
        """Most tokens `slot`'s history may hold (its class's cache length)."""

    @property
    def max_prefill_length(self) -> int:
        """Most tokens one request of `extend_slots` may carry."""

    @property
    def max_cache_length(self) -> int:
        """Most tokens the largest slot's history may hold."""

    @property
    def sampling(self) -> Any:
        """The default `SamplingSettings` (a request's own settings may change temperature and top_p)."""

    @property
    def params(self) -> Any:
        """The parameters calls use when given `params=None`."""

    def init_decode_state(self) -> Any:
        """A state with every slot empty and inactive."""

    def update_params(self, params) -> None:
        """Sample from `params` from now on (the trainer's arrays, used in place where their placement allows)."""

    def extend_slots(self, params, state, requests: list[ExtendRequest], *, context_bound: int | None = None):
        """Append each request's tokens to its slot (afresh when `reset`) and sample one token per slot.

        Returns (state, tokens [n], logprobs [n], cache lengths [n]) in request order; a sampled token is fed at
        the next decode step. `context_bound` >= every touched slot's length afterwards lets attention read only
        that much of the cache; a bound below a slot's length is a ValueError raised before anything runs. A
        {slot: bound} mapping gives each requested slot its own bound.
        """

    def generate_steps(self, params, state, num_steps: int, *, context_bound: int | None = None):
        """`num_steps` decode steps over every active slot -> (state, tokens, logprobs, valid, lengths), each
        [num_steps, slots]. A slot stops after a stop id or at its length limit (valid False from then on).
        `context_bound` as for `extend_slots`; a {slot: bound} mapping names the decoding slots (a backend with
        slot classes runs only the classes that hold one)."""

    def finish_slot(self, state, slot: int, length: int):
        """Deactivate `slot` and cut its history back to `length` tokens."""

    def prefill_cost(self, requests: list[ExtendRequest]) -> int:
        """Padded tokens `extend_slots(requests)` would compute (for batching decisions)."""
