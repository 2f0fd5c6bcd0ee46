"""Continuous batching of multi-turn BFCL episodes on a `Qwen3Engine`.

Each episode owns one decode slot from its first prefill to its end, so every turn extends the KV cache already
in that slot (no history is recomputed). While one slot waits for its environment step (running in the env pool's
worker processes), the other slots keep decoding; a slot is refilled with the next episode as soon as its episode
ends. Everything the model sees is appended as token ids: its sampled tokens (loss mask 1, with log-probs) and the
chat-template deltas of tool responses, feedback and new user turns (loss mask 0).

Per-episode rules (T3RL's, see REFERENCE.md): a reply with tool calls is executed and answered with `tool`
messages; a reply whose calls cannot be parsed gets a format-error user message; a reply without calls ends the user
turn and the next question is injected; at most `max_steps_per_turn` replies per turn (the turn is then cut off and
scored incorrect) and `max_model_calls` replies per episode; the sampled-token budget and the context length end the
episode. Turns never reached count as incorrect.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import time
from typing import Any

import numpy as np

from t3rl_jax import profiling
from t3rl_jax.chat_format import ChatEncoder, to_json
from t3rl_jax.rollout.engine import Qwen3Engine, SamplingSettings
from t3rl_jax.rollout.extend_batch import ExtendRequest
from t3rl_jax.rollout.trajectory import Trajectory
from t3rl_jax.tool_calls import parse_reply_ids

MAX_PREFILL_ROWS = 16


@dataclasses.dataclass(frozen=True)
class RolloutLimits:
    max_steps_per_turn: int = 10
    max_model_calls: int = 30
    max_response_tokens: int = 10_000   # tokens after the first prompt (sampled + observations)
    max_context_tokens: int = 32_768    # whole trajectory (must fit the engine's cache)
    decode_steps_per_call: int = 8      # decode steps per jitted call (fewer host round trips)
    prefill_tokens_per_call: int = 8192  # padded prefill tokens batched into one call (one longer chunk goes alone)


@dataclasses.dataclass(frozen=True)
class EpisodeRequest:
    entry_id: str
    group_id: int = 0
    sample_index: int = 0
    seed: int = 0
    augment: bool = False
    reward_kind: str = "progress"
    category: str = ""


@dataclasses.dataclass
class RolloutMetrics:
    episodes: int = 0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    decode_slot_steps: int = 0
    decode_active_slot_steps: int = 0
    env_steps: int = 0
    env_seconds: float = 0.0
    wall_seconds: float = 0.0
    episode_seconds: list = dataclasses.field(default_factory=list)

    def summary(self) -> dict[str, float]:
        def rate(n, s):
            return n / s if s > 0 else 0.0

        return {
            "rollout/episodes": self.episodes,
            "rollout/prefill_tokens_per_s": rate(self.prefill_tokens, self.prefill_seconds),
            "rollout/decode_tokens_per_s": rate(self.decode_tokens, self.decode_seconds),
            "rollout/slot_occupancy": rate(self.decode_active_slot_steps, self.decode_slot_steps),
            "rollout/env_step_ms": 1000 * rate(self.env_seconds, self.env_steps),
            "rollout/episode_latency_s": float(np.mean(self.episode_seconds)) if self.episode_seconds else 0.0,
            "rollout/wall_s": self.wall_seconds,
        }


class _Run:
    """Host-side state of one episode in a slot."""

    def __init__(self, request: EpisodeRequest, remote, slot: int):
        self.request = request
        self.remote = remote
        self.slot = slot
        self.traj = Trajectory(entry_id=request.entry_id, group_id=request.group_id,
                               sample_index=request.sample_index, category=request.category)
        self.cached = 0                  # trajectory tokens already in the slot's KV cache
        self.pending: cf.Future | None = remote.started
        self.on_pending = None           # set by the driver: handler of `pending`'s value
        self.close_with_im_end = False   # the last reply ended with <|endoftext|>: the delta closes it
        self.feed_ready = False          # trajectory tail is ready to be prefilled
        self.decoding = False
        self.msg_tokens: list[int] = []
        self.msg_logprobs: list[float] = []
        self.steps_in_turn = 0
        self.started_at = time.perf_counter()
        self.env_started = 0.0
        self.finished = False


class RolloutDriver:
    def __init__(self, engine: Qwen3Engine, pool, chat: ChatEncoder, *, limits: RolloutLimits = RolloutLimits(),
                 sampling: SamplingSettings | None = None, script=None):
        """`script(entry_id, turn, step_in_turn) -> assistant message dict` teacher-forces every reply instead of
        sampling (ground-truth replay through the real engine, episode logic and scoring; log-probs are 0)."""
        if limits.max_context_tokens > engine.max_cache_length:
            raise ValueError(f"max_context_tokens {limits.max_context_tokens} exceeds the engine's cache length "
                             f"{engine.max_cache_length}")
        self.engine = engine
        self.pool = pool
        self.chat = chat
        self.tokenizer = chat.tokenizer
        self.limits = limits
        self.sampling = sampling or engine.sampling
        self.script = script
        self.metrics = RolloutMetrics()

    # ------------------------------------------------------------------ public
    def run(self, requests: list[EpisodeRequest], params: Any = None, *, reset_metrics: bool = True
            ) -> list[Trajectory]:
        """Run all episodes to completion; trajectories come back in request order.

        `reset_metrics=False` adds to the metrics of earlier calls (several rollout rounds in one training step)."""
        params = self.engine.params if params is None else params
        if reset_metrics:
            self.metrics = RolloutMetrics()
        start = time.perf_counter()
        queue = collections.deque(enumerate(requests))
        free = list(range(self.engine.max_concurrent_decodes))[::-1]
        runs: dict[int, tuple[int, _Run]] = {}
        out: list[Trajectory | None] = [None] * len(requests)
        state = self.engine.init_decode_state()
        while queue or runs:
            while queue and free:
                index, req = queue.popleft()
                slot = free.pop()
                remote = self.pool.open(req.entry_id, augment=req.augment, reward_kind=req.reward_kind)
                run = _Run(req, remote, slot)
                run.on_pending = self._on_started
                runs[slot] = (index, run)
            ready = []
            for slot, (index, run) in list(runs.items()):
                self._advance(run)
                if run.finished:
                    out[index] = run.traj
                    state = self.engine.finish_slot(state, slot, 0)
                    del runs[slot]
                    free.append(slot)
                elif run.feed_ready:
                    ready.append(run)
            if ready:
                state = self._feed(params, state, ready)
            decoding = [r for _, r in runs.values() if r.decoding]
            if decoding:
                state = self._decode(params, state, decoding)
            elif runs:
                waiting = [r.pending for _, r in runs.values() if r.pending is not None]
                if waiting:
                    cf.wait(waiting, return_when=cf.FIRST_COMPLETED)
        self.metrics.wall_seconds += time.perf_counter() - start
        return out

    # ------------------------------------------------------------------ engine side
    def _feed(self, params, state, runs: list[_Run]):
        """Prefill every ready slot's new tokens, batched: episodes that start together share calls (and a GRPO
        group's identical prompts one computed row); tails longer than a prefill chunk go in rounds."""
        tails, forced = {}, {}
        for run in runs:
            tail = run.traj.token_ids[run.cached:]
            if self.script is not None:
                forced[run.slot] = self.chat.assistant_ids(
                    self.script(run.request.entry_id, run.traj.num_turns, run.steps_in_turn))
                tail = tail + forced[run.slot][:-1]  # cached like sampled tokens: all but the last, never fed
            tails[run.slot] = tail
        chunk = self.engine.max_prefill_length
        sampled = {}
        t0 = time.perf_counter()
        for offset in range(0, max(len(t) for t in tails.values()), chunk):
            requests = [ExtendRequest(run.slot, tails[run.slot][offset:offset + chunk],
                                      reset=run.cached == 0 and offset == 0, seed=run.request.seed,
                                      # The newest sampled token is never in the cache, so a cache capped at
                                      # end-1 keeps the trajectory <= end.
                                      limit=self._end(run) - 1, sampling=self.sampling)
                        for run in runs if len(tails[run.slot]) > offset]
            cached = {run.slot: run.cached for run in runs}
            for batch in self._prefill_batches(requests):
                # Each slot's cache holds exactly its `cached` trajectory tokens before this feed.
                bound = max(cached[r.slot] + offset + len(r.tokens) for r in batch)
                with profiling.scope("prefill"):
                    state, tokens, logprobs, _ = self.engine.extend_slots(params, state, batch, context_bound=bound)
                    tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
                for request, token, logprob in zip(batch, tokens, logprobs):
                    sampled[request.slot] = int(token), float(logprob)
        self.metrics.prefill_seconds += time.perf_counter() - t0
        self.metrics.prefill_tokens += sum(len(t) for t in tails.values())
        for run in runs:
            run.cached = run.traj.length
            run.feed_ready = False
            if run.slot in forced:
                run.msg_tokens, run.msg_logprobs = forced[run.slot], [0.0] * len(forced[run.slot])
                self._message_done(state, run)
                continue
            token, logprob = sampled[run.slot]
            run.msg_tokens, run.msg_logprobs = [token], [logprob]
            if token in self.tokenizer.stop_ids or run.traj.length >= self._end(run) - 1:
                self._message_done(state, run)
            else:
                run.decoding = True
        return state

    def _prefill_batches(self, requests: list[ExtendRequest]):
        """Split requests into engine calls computing at most `prefill_tokens_per_call` padded tokens each (what
        bounds prefill activation memory) and holding at most MAX_PREFILL_ROWS slots (each power-of-two row
        count is one more compiled variant); a request over the budget goes alone."""
        budget = self.limits.prefill_tokens_per_call
        batch: list[ExtendRequest] = []
        for request in requests:
            if batch and (len(batch) == MAX_PREFILL_ROWS or self.engine.prefill_cost(batch + [request]) > budget):
                yield batch
                batch = []
            batch.append(request)
        if batch:
            yield batch

    def _decode(self, params, state, decoding: list[_Run]):
        t0 = time.perf_counter()
        with profiling.scope("decode"):
            steps = self.limits.decode_steps_per_call
            # Cache length of a decoding slot: its cached trajectory plus the sampled tokens fed so far.
            bound = max(r.cached + len(r.msg_tokens) - 1 for r in decoding) + steps
            state, tokens, logprobs, valid, _ = self.engine.generate_steps(params, state, steps, context_bound=bound)
            tokens, logprobs, valid = np.asarray(tokens), np.asarray(logprobs), np.asarray(valid)
        self.metrics.decode_seconds += time.perf_counter() - t0
        self.metrics.decode_slot_steps += valid.size
        self.metrics.decode_active_slot_steps += int(valid.sum())
        for run in decoding:
            col = valid[:, run.slot]
            n = int(col.sum())  # valid steps form a prefix: a slot never restarts inside one call
            run.msg_tokens.extend(tokens[:n, run.slot].tolist())
            run.msg_logprobs.extend(logprobs[:n, run.slot].tolist())
            self.metrics.decode_tokens += n
            if n < len(col):
                self._message_done(state, run)
        return state

    # ------------------------------------------------------------------ episode logic (host)
    def _message_done(self, state, run: _Run) -> None:
        """The slot stopped (stop token or length limit): record the message and ask the environment."""
        run.decoding = False
        run.traj.append_sampled(run.msg_tokens, run.msg_logprobs)
        run.traj.num_model_calls += 1
        run.steps_in_turn += 1
        # The last sampled token was never fed; the slot's cache now holds exactly traj[:-1].
        run.cached = run.traj.length - 1
        reply = parse_reply_ids(run.msg_tokens, self.tokenizer)
        run.msg_tokens, run.msg_logprobs = [], []
        run.close_with_im_end = reply.finish_reason == "endoftext"
        if reply.finish_reason == "truncated":
            return self._end_episode(run, self._limit_reason(run, 0), cut_off_turn=True)
        if not reply.ok:
            run.traj.num_format_errors += 1
            return self._ask(run, run.remote.record_format_error(reply.feedback()), self._on_format_feedback)
        if reply.tool_calls:
            calls = [{"name": c.name, "arguments": c.arguments} for c in reply.tool_calls]
            run.traj.num_tool_calls += len(calls)
            return self._ask(run, run.remote.step(calls), self._on_tool_results)
        run.remote.record_text_reply()
        return self._ask(run, run.remote.end_turn(cut_off=False), self._on_turn_end)

    def _ask(self, run: _Run, future: cf.Future, handler) -> None:
        run.pending, run.on_pending = future, handler
        run.env_started = time.perf_counter()

    def _advance(self, run: _Run) -> None:
        if run.pending is None or not run.pending.done():
            return
        future, handler = run.pending, run.on_pending
        run.pending = run.on_pending = None
        if handler not in (self._on_started, self._on_finished):
            self.metrics.env_steps += 1
            self.metrics.env_seconds += time.perf_counter() - run.env_started
        try:
            value = future.result()
        except Exception as e:  # a crashed / timed-out worker: the episode fails, the run goes on
            run.traj.extras["env_error"] = f"{type(e).__name__}: {e}"
            if handler is self._on_finished:
                run.traj.termination = run.traj.termination or "env_failed"
                run.finished = True
                return
            return self._end_episode(run, "env_failed", cut_off_turn=False)
        handler(run, value)

    def _on_started(self, run: _Run, start) -> None:
        run.traj.append_observation(self.chat.prompt_ids(start.first_messages, start.tools))
        run.traj.prompt_length = run.traj.length
        run.feed_ready = True

    def _observe(self, run: _Run, messages: list[dict]) -> None:
        delta = self.chat.delta_ids(messages, close_assistant=run.close_with_im_end)
        if run.traj.length + len(delta) + 1 > self._end(run):
            return self._end_episode(run, self._limit_reason(run, len(delta) + 1), cut_off_turn=True)
        run.traj.append_observation(delta)
        run.feed_ready = True

    def _on_tool_results(self, run: _Run, results: list[str]) -> None:
        run.traj.num_tool_errors += sum(r.startswith("Error") or '"error"' in r[:40] for r in results)
        if run.traj.num_model_calls >= self.limits.max_model_calls:
            return self._end_episode(run, "max_model_calls", cut_off_turn=True)
        if run.steps_in_turn >= self.limits.max_steps_per_turn:
            run.traj.extras.setdefault("cut_off_turns", []).append(run.traj.num_turns)
            return self._ask(run, run.remote.end_turn(cut_off=True), self._on_turn_end)
        self._observe(run, [{"role": "tool", "content": r} for r in results])

    def _on_format_feedback(self, run: _Run, feedback: str) -> None:
        if run.traj.num_model_calls >= self.limits.max_model_calls:
            return self._end_episode(run, "max_model_calls", cut_off_turn=True)
        if run.steps_in_turn >= self.limits.max_steps_per_turn:
            return self._ask(run, run.remote.end_turn(cut_off=True), self._on_turn_end)
        self._observe(run, [{"role": "user", "content": feedback}])

    def _on_turn_end(self, run: _Run, turn_end) -> None:
        run.traj.num_turns += 1
        run.steps_in_turn = 0
        if turn_end.next_messages is None:
            return self._end_episode(run, "completed", cut_off_turn=False)
        if run.traj.num_model_calls >= self.limits.max_model_calls:
            return self._end_episode(run, "max_model_calls", cut_off_turn=False)
        messages = [dict(m) for m in turn_end.next_messages]
        if turn_end.revealed_tools:
            # The system prompt's <tools> block is already in the KV cache, so held-back tools (miss_func) are
            # shown in the turn's own message, in the same one-JSON-per-line form.
            listing = "\n".join(to_json(t) for t in turn_end.revealed_tools)
            messages[-1]["content"] += f"\n<tools>\n{listing}\n</tools>"
        self._observe(run, messages)

    def _end(self, run: _Run) -> int:
        """Trajectory length the episode may reach: the context, and the response budget (everything after the
        first prompt, tool output included, as verl/slime count multi-turn responses)."""
        return min(self.limits.max_context_tokens, run.traj.prompt_length + self.limits.max_response_tokens)

    def _limit_reason(self, run: _Run, extra: int) -> str:
        if run.traj.length + extra >= self.limits.max_context_tokens:
            return "context_limit"
        return "response_limit"

    def _end_episode(self, run: _Run, reason: str, *, cut_off_turn: bool) -> None:
        run.traj.termination = reason
        if cut_off_turn:
            run.remote.end_turn(cut_off=True)
        self._ask(run, run.remote.finish(), self._on_finished)

    def _on_finished(self, run: _Run, result) -> None:
        run.traj.reward = float(result.reward)
        run.traj.turn_correct = list(result.turn_correct)
        run.traj.extras.update(progress=result.progress, binary=result.binary, format_score=result.format_score,
                               num_entry_turns=result.num_turns)
        if result.failed:
            run.traj.termination = "env_failed"
            run.traj.extras["failure_reason"] = result.failure_reason
        self.metrics.episodes += 1
        self.metrics.episode_seconds.append(time.perf_counter() - run.started_at)
        run.finished = True
