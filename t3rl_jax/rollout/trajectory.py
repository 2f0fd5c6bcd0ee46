"""One episode's record, token-in/token-out.

The trajectory is the exact token sequence the model saw and produced: the prompt, every sampled assistant token,
and every observation delta (tool responses, injected user turns, format-error feedback) appended as token ids.
`loss_mask` is 1 exactly on model-sampled tokens and `logprobs` holds their sampling log-probs (0 elsewhere), so the
trainer never re-tokenises model output.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass
class Trajectory:
    entry_id: str
    group_id: int
    sample_index: int
    token_ids: list[int] = dataclasses.field(default_factory=list)
    loss_mask: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    prompt_length: int = 0
    reward: float = 0.0
    turn_correct: list[bool] = dataclasses.field(default_factory=list)
    termination: str = ""
    num_turns: int = 0
    num_model_calls: int = 0
    num_tool_calls: int = 0
    num_tool_errors: int = 0
    num_format_errors: int = 0
    num_replies_with_text: int = 0   # tool-call replies with text around the blocks (allowed, counted)
    num_truncated_replies: int = 0   # replies cut off by the per-call token budget (closed, then handled)
    category: str = ""
    # [start, end) of every model reply in token_ids, in order; a reply rewritten into bfcl-eval's history form
    # (observation tokens then) keeps its span, so the calls each reply made can be read back from the tokens.
    reply_spans: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)

    def append_observation(self, ids) -> None:
        ids = list(ids)
        self.token_ids.extend(ids)
        self.loss_mask.extend([0] * len(ids))
        self.logprobs.extend([0.0] * len(ids))

    def append_sampled(self, ids, logprobs) -> None:
        ids, logprobs = list(ids), list(logprobs)
        if len(ids) != len(logprobs):
            raise ValueError(f"{len(ids)} sampled tokens but {len(logprobs)} log-probs")
        self.reply_spans.append((self.length, self.length + len(ids)))
        self.token_ids.extend(ids)
        self.loss_mask.extend([1] * len(ids))
        self.logprobs.extend(float(x) for x in logprobs)

    def rewrite_tail(self, start: int, ids) -> None:
        """Replace every token from `start` on by `ids`, as observations (loss mask 0): the history continues from
        a form of the last reply that the model did not sample itself; `ids` keep that reply's span."""
        if not self.prompt_length <= start <= self.length:
            raise ValueError(f"rewrite_tail: start {start} outside [prompt_length {self.prompt_length}, "
                             f"length {self.length}]")
        ids = list(ids)
        del self.token_ids[start:], self.loss_mask[start:], self.logprobs[start:]
        self.reply_spans = [(a, b) for a, b in self.reply_spans if b <= start]
        self.append_observation(ids)
        self.reply_spans.append((start, self.length))

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def num_sampled(self) -> int:
        return int(sum(self.loss_mask))

    def arrays(self):
        return (np.asarray(self.token_ids, np.int32), np.asarray(self.loss_mask, np.int32),
                np.asarray(self.logprobs, np.float32))
