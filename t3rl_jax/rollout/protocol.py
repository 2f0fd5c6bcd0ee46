"""One BFCL episode's rules between the model's replies and its environment: reply -> execute / feedback / end turn
/ stop; the limits; the chat deltas the model sees next. All BFCL rollout rules live here.

The slot scheduler (scheduler.py) owns the engine side and talks to an episode only through:
    episode.pending            Future of the environment request in flight (None: nothing to wait for)
    episode.resume()           consume `pending` once it is done (its value or its exception)
    episode.wants_reply        the trajectory's new tail is to be prefilled and the model asked for a reply
    episode.reply_limit()      cache length at which the slot stops generating this reply
    episode.forced_reply()     the scripted reply's ids (teacher forcing), or None
    episode.take_rewind()      once after the history was rewritten: how many leading tokens are still valid
    episode.on_reply(ids, logprobs)   the model's reply is complete
    episode.released           the episode needs its slot no more (its result may still be on the way)
    episode.finished           the result is in; `episode.traj` is final
Nothing here looks at a clock: what happens next depends only on the replies and on the environment's answers.

Rules (T3RL's, REFERENCE.md "Recipe fidelity"):
- A reply with well-formed tool calls (text around them allowed) is executed; the results come back as `tool`
  messages. A reply whose calls cannot be parsed gets the environment's format-error feedback as a user message.
  A reply without calls is the turn's answer: the turn ends and the next question is injected.
- Steps per turn: tool-call and format-error replies count, the answer does not. A turn that has had more than
  `max_steps_per_turn` of them is cut off (scored incorrect): 10 tool steps, then the answer. The step over the
  limit still runs and its results are shown before the next question, as in T3RL.
- At most `max_model_calls` replies per episode.
- Tokens: `max_response_tokens` is the budget of each model call (T3RL's max_new_tokens). A reply cut off there is
  closed with `<|im_end|>` (loss mask 0) and handled like any other reply. The context (`max_context_tokens`) is
  the episode's only token cap: an episode that fills it ends (`context_limit`).
- miss_func reveals: the environment's reveal message is appended as it is; in both prompt styles it carries the
  revealed docs and the tool list stays the first turn's (T3RL's and bfcl-eval's Qwen handler both do so).
- `bfcl` style: bfcl-eval's Qwen handler keeps a reply with tool calls in its history as `content=""` plus the calls
  re-serialised (`json.dumps` arguments), dropping the text around them. Such a reply is rewritten to that form
  when it differs (the rewritten tokens are observations, loss mask 0; `extras["rewritten_replies"]`) and the slot
  is rewound to the reply's start before the next prefill. The `t3rl` style keeps every sampled token.
Terminations: completed, max_model_calls, context_limit, env_failed (with `extras["failure_reason"]`).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
from collections.abc import Callable
from typing import Any

from t3rl_jax.chat_format import ChatEncoder
from t3rl_jax.rollout.trajectory import Trajectory
from t3rl_jax.tool_calls import parse_reply_ids

PROMPT_STYLES = ("t3rl", "bfcl")


@dataclasses.dataclass(frozen=True)
class RolloutLimits:
    max_steps_per_turn: int = 10        # tool-call / format-error replies per turn before it is cut off (+ answer)
    max_model_calls: int = 30           # replies per episode
    max_response_tokens: int = 10_000   # new tokens per model call
    max_context_tokens: int = 32_768    # whole trajectory, the episode's only token cap (fits the engine's cache)
    decode_steps_per_call: int = 8      # decode steps per jitted call (fewer host round trips)
    prefill_tokens_per_call: int = 8192  # padded prefill tokens batched into one call (one longer chunk goes alone)
    # Longest the scheduler waits for an environment reply before the other slots go on without it. Replies are
    # waited for at fixed points so that runs are reproducible; a reply later than this (a hung worker, which the
    # pool kills after its step timeout) is taken when it comes and counted in `rollout/env_late_replies`.
    env_wait_s: float = 60.0

    def __post_init__(self):
        for name in ("max_steps_per_turn", "max_model_calls", "max_response_tokens", "max_context_tokens",
                     "decode_steps_per_call", "prefill_tokens_per_call"):
            if getattr(self, name) < 1:
                raise ValueError(f"RolloutLimits.{name} must be >= 1, got {getattr(self, name)}")
        if self.env_wait_s <= 0:
            raise ValueError(f"RolloutLimits.env_wait_s must be positive, got {self.env_wait_s}")


@dataclasses.dataclass(frozen=True)
class EpisodeRequest:
    entry_id: str
    group_id: int = 0
    sample_index: int = 0
    seed: int = 0
    augment: bool = False
    reward_kind: str = "progress"
    category: str = ""
    prompt_style: str = "t3rl"

    def __post_init__(self):
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"EpisodeRequest({self.entry_id!r}): unknown prompt_style {self.prompt_style!r}; "
                             f"expected one of {PROMPT_STYLES}")


def open_remote(pool, request: EpisodeRequest):
    """Open the request's episode in the pool (`started` resolves to its EpisodeStart)."""
    return pool.open(request.entry_id, augment=request.augment, reward_kind=request.reward_kind,
                     prompt_style=request.prompt_style)


def _is_tool_error(result: str) -> bool:
    return result.startswith("Error") or '"error"' in result[:40]


class EpisodeProtocol:
    """One episode: its trajectory, its turn state, and the environment request in flight."""

    def __init__(self, request: EpisodeRequest, remote, chat: ChatEncoder, limits: RolloutLimits, *,
                 script: Callable[[str, int, int], dict] | None = None):
        """`script(entry_id, turn, reply_in_turn) -> assistant message` teacher-forces every reply."""
        self.request = request
        self.remote = remote
        self.chat = chat
        self.limits = limits
        self.script = script
        self.traj = Trajectory(entry_id=request.entry_id, group_id=request.group_id,
                               sample_index=request.sample_index, category=request.category)
        self.pending: cf.Future | None = None
        self.wants_reply = False
        self.released = False
        self.finished = False
        self._handler: Callable[[Any], None] | None = None
        self._attempts = 0           # tool-call and format-error replies in the current turn
        self._replies_in_turn = 0
        self._close_reply = False    # the last reply did not end with <|im_end|>: the next delta writes it
        self._carry: list[dict] = []  # results of a cut-off turn's last step, shown before the next question
        self._rewind: int | None = None
        self._ask(remote.started, self._on_started)

    # ------------------------------------------------------------------ the scheduler's side
    def resume(self) -> None:
        future, handler = self.pending, self._handler
        if future is None or not future.done():
            raise RuntimeError(f"episode {self.request.entry_id}: resume() needs a done request")
        self.pending = self._handler = None
        try:
            value = future.result()
        except Exception as e:  # a crashed / timed-out worker or a refused request: this episode fails, no other
            return self._env_failed(e, handler)
        handler(value)

    def reply_limit(self) -> int:
        """Cache length at which generation stops: the newest sampled token is never in the cache, so a cache capped
        at end - 1 keeps the trajectory at <= end tokens (end = this call's budget, within the context)."""
        return min(self.limits.max_context_tokens, self.traj.length + self.limits.max_response_tokens) - 1

    def forced_reply(self) -> list[int] | None:
        if self.script is None:
            return None
        message = self.script(self.request.entry_id, self.traj.num_turns, self._replies_in_turn)
        return self.chat.assistant_ids(message)[:self.reply_limit() + 1 - self.traj.length]

    def take_rewind(self) -> int | None:
        rewind, self._rewind = self._rewind, None
        return rewind

    def on_reply(self, ids, logprobs) -> None:
        t = self.traj
        self.wants_reply = False
        start = t.length
        t.append_sampled(ids, logprobs)
        t.num_model_calls += 1
        self._replies_in_turn += 1
        reply = parse_reply_ids(ids, self.chat.tokenizer)
        self._close_reply = reply.finish_reason != "im_end"
        if reply.finish_reason == "truncated":
            if t.length >= self.limits.max_context_tokens:
                return self._end("context_limit", cut_off_turn=True)
            t.num_truncated_replies += 1
        if not reply.ok:
            self._attempts += 1
            t.num_format_errors += 1
            return self._ask(self.remote.record_format_error(reply.feedback()), self._on_feedback)
        if reply.tool_calls:
            self._attempts += 1
            t.num_tool_calls += len(reply.tool_calls)
            t.num_replies_with_text += int(reply.surrounding_text)
            calls = [{"name": c.name, "arguments": c.arguments} for c in reply.tool_calls]
            if self.request.prompt_style == "bfcl":
                self._as_bfcl_history(start, calls)
            return self._ask(self.remote.step(calls), self._on_tool_results)
        self.remote.record_text_reply()
        self._ask(self.remote.end_turn(cut_off=False), self._on_turn_end)

    # ------------------------------------------------------------------ environment answers
    def _ask(self, future: cf.Future, handler: Callable[[Any], None]) -> None:
        self.pending, self._handler = future, handler

    def _as_bfcl_history(self, start: int, calls: list[dict]) -> None:
        wire = [{"name": c["name"], "arguments": json.dumps(c["arguments"])} for c in calls]
        ids = self.chat.assistant_ids({"role": "assistant", "content": "", "tool_calls": wire})
        if ids == self.traj.token_ids[start:]:
            return
        self.traj.rewrite_tail(start, ids)
        self.traj.extras["rewritten_replies"] = self.traj.extras.get("rewritten_replies", 0) + 1
        self._close_reply = False  # the rewritten reply ends with <|im_end|>
        self._rewind = start

    def _on_started(self, start) -> None:
        ids = self.chat.prompt_ids([dict(m) for m in start.first_messages], list(start.tools))
        self.traj.append_observation(ids)
        self.traj.prompt_length = len(ids)
        if len(ids) + 1 > self.limits.max_context_tokens:
            return self._end("context_limit", cut_off_turn=True)
        self.wants_reply = True

    def _on_tool_results(self, results: list[str]) -> None:
        self.traj.num_tool_errors += sum(_is_tool_error(r) for r in results)
        messages = [{"role": "tool", "content": r} for r in results]
        if self._attempts > self.limits.max_steps_per_turn:
            return self._cut_off_turn(carry=messages)
        if self.traj.num_model_calls >= self.limits.max_model_calls:
            return self._end("max_model_calls", cut_off_turn=True)
        self._observe(messages)

    def _on_feedback(self, feedback: str) -> None:
        if self._attempts > self.limits.max_steps_per_turn:
            return self._cut_off_turn(carry=[])
        if self.traj.num_model_calls >= self.limits.max_model_calls:
            return self._end("max_model_calls", cut_off_turn=True)
        self._observe([{"role": "user", "content": feedback}])

    def _cut_off_turn(self, carry: list[dict]) -> None:
        self.traj.extras.setdefault("cut_off_turns", []).append(self.traj.num_turns)
        self._carry = carry
        self._ask(self.remote.end_turn(cut_off=True), self._on_turn_end)

    def _on_turn_end(self, turn_end) -> None:
        t = self.traj
        t.num_turns += 1
        self._attempts = self._replies_in_turn = 0
        carry, self._carry = self._carry, []
        if turn_end.next_messages is None:
            return self._end("completed", cut_off_turn=False)
        if t.num_model_calls >= self.limits.max_model_calls:
            return self._end("max_model_calls", cut_off_turn=False)
        self._observe(carry + [dict(m) for m in turn_end.next_messages])

    def _observe(self, messages: list[dict]) -> None:
        delta = self.chat.delta_ids(messages, close_assistant=self._close_reply)
        if self.traj.length + len(delta) + 1 > self.limits.max_context_tokens:
            return self._end("context_limit", cut_off_turn=True)
        self.traj.append_observation(delta)
        self._close_reply = False
        self.wants_reply = True

    # ------------------------------------------------------------------ the end
    def _end(self, reason: str, *, cut_off_turn: bool) -> None:
        self.traj.termination = reason
        self.wants_reply = False
        if cut_off_turn:
            self.remote.end_turn(cut_off=True)  # the pool serves an episode's requests in order: before finish
        self.released = True
        self._ask(self.remote.finish(), self._on_finished)

    def _env_failed(self, error: Exception, handler) -> None:
        self.traj.extras["env_error"] = f"{type(error).__name__}: {error}"
        self.traj.extras.setdefault("failure_reason", getattr(error, "reason", None) or str(error))
        if handler == self._on_finished:
            self.traj.termination = "env_failed"
            self.traj.reward = 0.0
            self.released = self.finished = True
            return
        self._end("env_failed", cut_off_turn=False)

    def _on_finished(self, result) -> None:
        t = self.traj
        t.reward = float(result.reward)
        t.turn_correct = list(result.turn_correct)
        t.extras.update(progress=result.progress, binary=result.binary, format_score=result.format_score,
                        num_entry_turns=result.num_turns)
        if result.failed or t.termination == "env_failed":
            t.termination = "env_failed"
            t.reward = 0.0
            t.extras["failure_reason"] = result.failure_reason or t.extras.get("failure_reason") or "unknown"
        self.finished = True
