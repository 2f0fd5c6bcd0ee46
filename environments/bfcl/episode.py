"""One multi-turn episode: its isolated environment, the turn sequence, and its rewards."""

from __future__ import annotations

from dataclasses import dataclass, field

from environments.bfcl import catalog, hints, prompts, reward
from environments.bfcl.executor import OK, ToolEnvironment
from environments.bfcl.ground_truth import ground_truth_trace


class EpisodeStateError(RuntimeError):
    """An episode method was called when the episode could not accept it (e.g. after it finished)."""


@dataclass(frozen=True)
class EpisodeResult:
    """Final, picklable summary of an episode."""

    entry_id: str
    num_turns: int
    turn_correct: tuple[bool, ...]
    progress: float
    binary: float
    format_score: float
    reward: float
    reward_kind: str
    failed: bool = False
    failure_reason: str | None = None
    cut_off_turns: tuple[int, ...] = field(default=())


class Episode:
    """A BFCL multi-turn episode driven one model reply at a time.

    `augment` appends corrective hints to failed results; `reward_kind` picks what `.reward` returns
    ("progress", "binary" or "format"); `prompt_style` picks the system prompt, tool docs and reveal messages
    (`environments.bfcl.prompts`)."""

    def __init__(self, entry_id: str, *, augment: bool = False, reward_kind: str = "progress",
                 prompt_style: str = prompts.DEFAULT_STYLE):
        if reward_kind not in reward.REWARD_KINDS:
            raise ValueError(f"unknown reward kind {reward_kind!r}; expected one of {reward.REWARD_KINDS}")
        self.prompt_style = prompts.check_style(prompt_style)
        self.entry = catalog.load_entry(entry_id)
        self.augment = augment
        self.reward_kind = reward_kind
        self._env = ToolEnvironment.for_entry(self.entry)
        self._trace = ground_truth_trace(entry_id)
        self.turn = 0
        self._results: list[str] = []  # bfcl-format results of every call so far (the response check's pool)
        self._calls_in_turn = 0
        self._turn_correct: list[bool] = []
        self._cut_off: list[int] = []
        self._replies: list[str] = []  # reward.REPLY_CLASSES, one per reply (the format reward)
        self.failure_reason: str | None = None
        self.done = False

    # ---- what the model sees -------------------------------------------------------------------------------
    @property
    def entry_id(self) -> str:
        return self.entry.id

    @property
    def num_turns(self) -> int:
        return self.entry.num_turns

    @property
    def tools(self) -> list[dict]:
        """The style's tool docs: the first turn's tools, kept for the whole episode (revealed tools arrive in
        the reveal message)."""
        return prompts.tools(self.entry, self.prompt_style)

    @property
    def tools_json(self) -> str:
        return prompts.tools_json(self.entry, self.prompt_style)

    @property
    def revealed_tools(self) -> list[dict]:
        """Tools revealed at the current turn (miss_func reveal turns) in the style's doc form, else []."""
        return prompts.revealed_tools(self.entry, self.turn, self.prompt_style)

    @property
    def first_messages(self) -> list[dict]:
        """The style's system prompt (if any) and the user messages of turn 0."""
        return prompts.first_messages(self.entry, self.prompt_style)

    @property
    def current_messages(self) -> list[dict]:
        """User messages that opened the current turn (the style's reveal message at a reveal turn)."""
        self._require_open()
        return prompts.turn_messages(self.entry, self.turn, self.prompt_style)

    # ---- driving the episode ---------------------------------------------------------------------------------
    def step(self, calls: list) -> list[str]:
        """Execute the calls of one assistant reply in order; one result string per call."""
        self._require_open()
        if not isinstance(calls, list) or not calls:
            raise ValueError("step() needs a non-empty list of calls; use record_text_reply() for a reply without one")
        visible = self.entry.tool_names_at(self.turn) if self.augment else []
        shown, all_ran_clean = [], True
        for item in calls:
            outcome = self._env.execute(item)
            self._results.append(outcome.result)
            # Held-back miss_func tools run as in bfcl-eval (its own ground truth sometimes calls one early),
            # so any tool of the entry's classes counts as known here.
            all_ran_clean = all_ran_clean and outcome.kind == OK  # EnvTuning: any error in the results
            text = outcome.result
            if self.augment:
                hint = hints.hint_for(outcome, visible)
                if hint:
                    text += hints.HINT_PREFIX + hint
            shown.append(text)
        self._replies.append(reward.TOOLS_OK if all_ran_clean else reward.TOOLS_ERROR)
        self._calls_in_turn += len(calls)
        return shown

    def record_text_reply(self) -> None:
        """Record an assistant reply without tool calls (it normally ends the turn: call end_turn next)."""
        self._require_open()
        self._replies.append(reward.ANSWER)

    def record_format_error(self, reason: str) -> str:
        """Record a reply whose tool calls could not be parsed; returns the feedback text for the model."""
        self._require_open()
        self._replies.append(reward.FORMAT_ERROR)
        reason = reason if len(reason) <= 300 else reason[:300] + "..."
        text = f"Error: the tool calls in your reply could not be parsed ({reason})."
        if self.augment:
            text += hints.HINT_PREFIX + hints.format_error_hint()
        return text

    def end_turn(self, *, cut_off: bool = False) -> list[dict] | None:
        """Close the current turn (`cut_off` if a step limit stopped it) and return the next turn's user
        messages, or None when the episode is over."""
        self._require_open()
        gt = self._trace[self.turn]
        empty = not self.entry.ground_truth[self.turn]
        state_ok = responses_ok = None
        if not empty and not cut_off and self._calls_in_turn > 0:
            state_ok = reward.state_matches(self._env.instances, gt.state)
            responses_ok = state_ok and reward.responses_contained(gt.results, self._results)
        self._turn_correct.append(reward.turn_is_correct(
            ground_truth_empty=empty, calls_in_turn=self._calls_in_turn, cut_off=cut_off,
            state_ok=state_ok, responses_ok=responses_ok,
        ))
        if cut_off:
            self._cut_off.append(self.turn)
        self.turn += 1
        self._calls_in_turn = 0
        if self.turn >= self.num_turns:
            self.done = True
            return None
        return prompts.turn_messages(self.entry, self.turn, self.prompt_style)

    def fail(self, reason: str) -> None:
        """Mark the episode failed (e.g. its worker crashed): every reward becomes 0."""
        self.failure_reason = reason or "failed"
        self.done = True

    # ---- rewards ---------------------------------------------------------------------------------------------
    @property
    def turn_correct(self) -> list[bool]:
        return list(self._turn_correct)

    @property
    def progress(self) -> float:
        if self.failure_reason:
            return 0.0
        return reward.progress_reward(self._turn_correct, self.num_turns)

    @property
    def binary(self) -> float:
        if self.failure_reason:
            return 0.0
        return reward.binary_reward(self._turn_correct, self.num_turns)

    @property
    def format_score(self) -> float:
        if self.failure_reason:
            return 0.0
        return reward.format_reward(self._replies)

    @property
    def reward(self) -> float:
        return reward.select_reward(
            self.reward_kind, progress=self.progress, binary=self.binary, format_score=self.format_score
        )

    def result(self) -> EpisodeResult:
        return EpisodeResult(
            entry_id=self.entry_id,
            num_turns=self.num_turns,
            turn_correct=tuple(self._turn_correct),
            progress=self.progress,
            binary=self.binary,
            format_score=self.format_score,
            reward=self.reward,
            reward_kind=self.reward_kind,
            failed=self.failure_reason is not None,
            failure_reason=self.failure_reason,
            cut_off_turns=tuple(self._cut_off),
        )

    # ---- internals -------------------------------------------------------------------------------------------
    def _require_open(self) -> None:
        if self.done:
            raise EpisodeStateError(
                f"episode {self.entry_id} is over" + (f" (failed: {self.failure_reason})" if self.failure_reason else "")
            )
