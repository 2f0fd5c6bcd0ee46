"""Continuous batching of episodes over a rollout backend's decode slots: which slot runs which episode, prefill
batches within a token budget, decode calls, and the rollout metrics. The episode rules are protocol.py's.

Each episode owns one slot from its first prefill until it releases it, so every turn extends the KV cache already in
that slot (no history is recomputed). While some episodes wait for their environment the other slots keep decoding,
and a released slot takes the next queued episode at once.

Reproducible by construction. The scheduler works in ticks; each tick it (1) fills free slots (lowest slot first,
requests in order), (2) prefills every episode that wants a reply and runs one decode call over the generating
slots, (3) waits for every environment request issued before this tick (they ran while (2) computed) and hands the
answers to their episodes in slot order. Which slots share a call therefore depends only on the replies and on the
environment's answers, never on when an answer arrived; the engine draws each token from (episode seed, position).
An answer later than `limits.env_wait_s` (a hung worker) stops holding the others back: it is taken at the first
tick after it arrives and counted in `rollout/env_late_replies`, the one case where timing can change the batching.

Slot classes (a backend whose `slot_classes` has several (slots, cache length) entries, `slot_classes.py`): a new
episode takes the smallest class with a free slot (`slot_pool.SlotPool`); an episode whose history would outgrow its
slot (before a prefill that does not fit, or when decoding fills the slot mid-reply) moves to the smallest larger
class with a free slot, its cache copied there, and its reply goes on exactly where it stopped (tokens are drawn
from (episode seed, position)). Until such a slot is free it waits (`rollout/migration_wait_ticks`).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import time
from collections.abc import Callable

import numpy as np

from t3rl_jax import profiling
from t3rl_jax.rollout.extend_batch import ExtendRequest
from t3rl_jax.rollout.protocol import EpisodeProtocol, EpisodeRequest, RolloutLimits
from t3rl_jax.rollout.rollout_metrics import RolloutMetrics
from t3rl_jax.rollout.slot_pool import SlotPool, fits
from t3rl_jax.rollout.trajectory import Trajectory

MAX_PREFILL_ROWS = 16  # slots per prefill call: each power-of-two row count is one more compiled variant


@dataclasses.dataclass
class _Slot:
    """Engine-side state of one occupied slot."""

    index: int                   # the request's position in the run
    episode: EpisodeProtocol
    started_at: float
    cached: int = 0              # trajectory tokens already in the slot's KV cache
    decoding: bool = False
    tokens: list = dataclasses.field(default_factory=list)    # the reply being generated
    logprobs: list = dataclasses.field(default_factory=list)
    planned: bool = False        # `limit` and `forced` are set for the reply asked for
    limit: int = 0               # cache length at which the reply stops (the episode's `reply_limit`)
    forced: list | None = None   # the scripted reply (teacher forcing), or None

    def history(self) -> int:
        """Tokens the slot must hold to go on with the reply: the trajectory and the reply's tokens so far (a
        reply cut by a full slot: all but the last are cached, the last is fed next) or all of a scripted reply
        but its last token."""
        forced = len(self.forced) - 1 if self.forced else 0
        return self.episode.traj.length + forced + len(self.tokens)


def _backend_classes(engine) -> tuple[tuple[int, int], ...]:
    return tuple(getattr(engine, "slot_classes", ((engine.max_concurrent_decodes, engine.max_cache_length),)))


def check_context_fits(limits: RolloutLimits, engine) -> None:
    if limits.max_context_tokens > engine.max_cache_length:
        raise ValueError(f"max_context_tokens {limits.max_context_tokens} exceeds the engine's cache length "
                         f"{engine.max_cache_length}")


class SlotScheduler:
    def __init__(self, engine, limits: RolloutLimits, sampling, metrics: RolloutMetrics, *, stop_ids):
        """`engine`: a rollout backend (`Qwen3Engine`'s slot methods); `sampling`: SamplingSettings of every slot;
        `stop_ids`: the tokens that end a reply (the engine's: `<|im_end|>`, `<|endoftext|>`)."""
        check_context_fits(limits, engine)
        self.engine = engine
        self.limits = limits
        self.sampling = sampling
        self.metrics = metrics
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self._late: set[int] = set()  # ids of requests that overran env_wait_s

    def run(self, params, requests: list[EpisodeRequest],
            start: Callable[[EpisodeRequest], EpisodeProtocol]) -> list[Trajectory]:
        """Run every request's episode to its end (`start` opens one); trajectories in request order."""
        queue = collections.deque(enumerate(requests))
        pool = SlotPool(_backend_classes(self.engine))
        slots: dict[int, _Slot] = {}
        releasing: list[_Slot] = []          # released their slot, result still on the way
        issued: dict[int, tuple[cf.Future, int]] = {}  # id(episode) -> (its pending request, tick issued)
        out: list[Trajectory | None] = [None] * len(requests)
        state = self.engine.init_decode_state()
        tick = 0
        while queue or slots or releasing:
            state = self._move_outgrown(state, pool, slots)  # before new episodes: they must not take the slots
            while queue:
                slot = pool.take_new()
                if slot is None:
                    break
                index, request = queue.popleft()
                slots[slot] = _Slot(index, start(request), time.perf_counter())
            self._stamp(slots.values(), issued, tick - 1)  # opened this tick: their start overlaps this tick
            ready = [(s, r) for s, r in sorted(slots.items()) if self._ready(r) and fits(
                pool.capacity(s), r.history(), r.limit)]
            if ready:
                state = self._feed(params, state, ready, pool)
            decoding = [(s, r) for s, r in sorted(slots.items()) if r.decoding]
            if decoding:
                state = self._decode(params, state, decoding, pool)
            self._stamp(slots.values(), issued, tick)
            self._answer([r for _, r in sorted(slots.items())] + releasing, issued, tick,
                         idle=not ready and not decoding)
            for slot, run in sorted(slots.items()):
                if run.episode.released:
                    state = self.engine.finish_slot(state, slot, 0)
                    del slots[slot]
                    pool.release(slot)
                    releasing.append(run)
            for run in [r for r in releasing if r.episode.finished]:
                releasing.remove(run)
                issued.pop(id(run.episode), None)
                out[run.index] = run.episode.traj
                self.metrics.count_episode(run.episode.traj, time.perf_counter() - run.started_at)
            tick += 1
        return out

    # ------------------------------------------------------------------ slot classes
    @staticmethod
    def _ready(run: _Slot) -> bool:
        """The run wants its history prefilled and a reply (or the rest of one) sampled; plans the reply once."""
        if not run.episode.wants_reply or run.decoding:
            return False
        if not run.planned:
            run.forced = run.episode.forced_reply()
            run.limit = (run.episode.traj.length + len(run.forced) - 1 if run.forced is not None
                         else run.episode.reply_limit())
            run.planned = True
        return True

    def _move_outgrown(self, state, pool: SlotPool, slots: dict[int, _Slot]):
        """Move every episode whose slot cannot hold its history (before its next prefill, or a reply cut by the
        full slot) to the smallest class that can, lowest slot first: its cache is copied there
        (`SlotClassBackend.move_slot`) and a cut reply goes on decoding."""
        for slot, run in sorted(slots.items()):
            if not self._ready(run) or fits(pool.capacity(slot), run.history(), run.limit):
                continue
            target = pool.take_fitting(run.history(), run.limit)
            if target is None:
                self.metrics.migration_wait_ticks += 1
                continue
            state = self.engine.move_slot(state, slot, target, limit=run.limit, decoding=bool(run.tokens))
            pool.release(slot)
            del slots[slot]
            slots[target] = run
            run.decoding = bool(run.tokens)
            self.metrics.migrations += 1
        return state

    # ------------------------------------------------------------------ environment side
    @staticmethod
    def _stamp(runs, issued, tick: int) -> None:
        """Remember when each new environment request was issued."""
        for run in runs:
            pending = run.episode.pending
            if pending is not None and issued.get(id(run.episode), (None,))[0] is not pending:
                issued[id(run.episode)] = (pending, tick)

    def _answer(self, order: list[_Slot], issued, tick: int, *, idle: bool) -> None:
        """Wait for the requests issued before `tick` and hand every done one to its episode, in `order`.

        A request already known to be late is not waited for again (the other slots go on), except when nothing
        else is left to do (`idle`): then the first answer to come is waited for."""
        due = [run for run in order if run.episode.pending is not None and issued[id(run.episode)][1] < tick]
        if not due:
            return
        waited = [run.episode.pending for run in due if id(run.episode.pending) not in self._late]
        t0 = time.perf_counter()
        if waited:
            _, late = cf.wait(waited, timeout=self.limits.env_wait_s)
            self.metrics.env_late_replies += len(late)
            self._late.update(id(f) for f in late)
        elif idle:
            cf.wait([run.episode.pending for run in due], timeout=self.limits.env_wait_s,
                    return_when=cf.FIRST_COMPLETED)
        self.metrics.env_seconds += time.perf_counter() - t0
        for run in due:
            if run.episode.pending.done():
                self._late.discard(id(run.episode.pending))
                self.metrics.env_requests += 1
                run.episode.resume()
        for run in order:  # a chained request issued while answering is due at the next tick
            pending = run.episode.pending
            if pending is not None and issued[id(run.episode)][0] is not pending:
                issued[id(run.episode)] = (pending, tick)

    # ------------------------------------------------------------------ engine side
    def _feed(self, params, state, ready: list[tuple[int, _Slot]], pool: SlotPool):
        """Prefill every ready slot's new tokens, batched: episodes that start together share calls (and a GRPO
        group's identical prompts one computed row); tails longer than a prefill chunk go in rounds."""
        tails = {}
        for slot, run in ready:
            episode = run.episode
            keep = episode.take_rewind()
            if keep is not None and keep < run.cached:  # the history was rewritten from `keep` on
                state = self.engine.finish_slot(state, slot, keep)
                run.cached = keep
            tail = episode.traj.token_ids[run.cached:]
            if run.forced is not None:
                tail = tail + run.forced[:-1]  # cached like sampled tokens: all but the last, never fed
            tails[slot] = tail
        chunk = self.engine.max_prefill_length
        sampled = {}
        t0 = time.perf_counter()
        for offset in range(0, max(len(t) for t in tails.values()), chunk):
            requests = [ExtendRequest(slot, tails[slot][offset:offset + chunk], reset=run.cached == 0 and offset == 0,
                                      seed=run.episode.request.seed, limit=run.limit, sampling=self.sampling)
                        for slot, run in ready if len(tails[slot]) > offset]
            cached = {slot: run.cached for slot, run in ready}
            for batch in self._prefill_batches(requests, pool.capacity):
                # Each slot's cache holds exactly its `cached` trajectory tokens before this feed.
                bound = {r.slot: cached[r.slot] + offset + len(r.tokens) for r in batch}
                with profiling.scope("prefill"):
                    state, tokens, logprobs, _ = self.engine.extend_slots(params, state, batch, context_bound=bound)
                    tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
                for request, token, logprob in zip(batch, tokens, logprobs):
                    sampled[request.slot] = int(token), float(logprob)
        self.metrics.prefill_seconds += time.perf_counter() - t0
        self.metrics.prefill_tokens += sum(len(t) for t in tails.values())
        for slot, run in ready:
            if run.forced is not None:
                self._reply_done(run, run.forced, [0.0] * len(run.forced))
                continue
            run.cached = run.episode.traj.length
            token, logprob = sampled[slot]
            run.tokens.append(token)
            run.logprobs.append(logprob)
            run.decoding = True
            self._check_stop(run)
        return state

    def _prefill_batches(self, requests: list[ExtendRequest], capacity: Callable[[int], int] | None = None):
        """Split requests into engine calls computing at most `prefill_tokens_per_call` padded tokens each (what
        bounds prefill activation memory) and holding at most MAX_PREFILL_ROWS slots; a request over the budget
        goes alone. With `capacity` (slot -> its class's cache length) a call holds slots of one class."""
        budget = self.limits.prefill_tokens_per_call
        batch: list[ExtendRequest] = []
        for request in requests:
            if batch and (len(batch) == MAX_PREFILL_ROWS or self.engine.prefill_cost(batch + [request]) > budget
                          or (capacity is not None and capacity(batch[0].slot) != capacity(request.slot))):
                yield batch
                batch = []
            batch.append(request)
        if batch:
            yield batch

    def _decode(self, params, state, decoding: list[tuple[int, _Slot]], pool: SlotPool):
        t0 = time.perf_counter()
        steps = self.limits.decode_steps_per_call
        with profiling.scope("decode"):
            # Cache length of a decoding slot: its cached trajectory plus the sampled tokens fed so far.
            bound = {slot: run.cached + len(run.tokens) - 1 + steps for slot, run in decoding}
            state, tokens, logprobs, valid, _ = self.engine.generate_steps(params, state, steps, context_bound=bound)
            tokens, logprobs, valid = np.asarray(tokens), np.asarray(logprobs), np.asarray(valid)
        self.metrics.decode_seconds += time.perf_counter() - t0
        self.metrics.count_decode(valid, pool.classes)
        for slot, run in decoding:
            column = valid[:, slot]
            n = int(column.sum())  # valid steps form a prefix: a slot never restarts inside one call
            run.tokens.extend(tokens[:n, slot].tolist())
            run.logprobs.extend(logprobs[:n, slot].tolist())
            self.metrics.decode_tokens += n
            if n < len(column):
                self._check_stop(run, stopped=True)
        return state

    def _check_stop(self, run: _Slot, *, stopped: bool = False) -> None:
        """After new tokens: the reply is done at a stop id or its limit. A slot that stopped short of both (its
        cache is full: `stopped`, or a prefill that filled it) keeps the reply and moves (`_move_outgrown`)."""
        if run.tokens[-1] in self.stop_ids or run.cached + len(run.tokens) - 1 >= run.limit:
            self._reply_done(run, run.tokens, run.logprobs)
        elif stopped:
            run.decoding = False

    @staticmethod
    def _reply_done(run: _Slot, tokens: list[int], logprobs: list[float]) -> None:
        """The slot stopped (stop token or limit); its cache holds every reply token but the last, never fed."""
        run.decoding = run.planned = False
        run.cached = run.episode.traj.length + len(tokens) - 1
        run.tokens, run.logprobs, run.forced = [], [], None
        run.episode.on_reply(tokens, logprobs)
