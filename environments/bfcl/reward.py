"""Per-turn correctness with bfcl-eval's multi-turn checker semantics, and the episode rewards built on it.

A turn with ground truth is correct when the model called at least one tool during it, the public attributes of
every instance equal those of the ground-truth replay after that turn (state check), and every ground-truth
result of the turn appears among all the model's results so far, as a multiset in any order (response check).
bfcl-eval skips turns whose ground truth is empty; here they count, correct iff the model made no call
(EnvTuning's scoring). Turns cut off by a step limit, and turns never reached, count as incorrect.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

REWARD_KINDS = ("progress", "binary", "format")


def responses_contained(expected: Sequence[str], produced: Sequence[str]) -> bool:
    """Every expected result occurs in `produced`, counting duplicates, order ignored."""
    available = Counter(produced)
    for item, needed in Counter(expected).items():
        if available[item] < needed:
            return False
    return True


_MISSING = object()


def state_matches(instances: Mapping[str, Any], expected_state: Mapping[str, Mapping[str, Any]]) -> bool:
    """Each expected public attribute equals the same attribute of the model's instance of that class."""
    for class_name, attributes in expected_state.items():
        instance = instances[class_name]
        for name, value in attributes.items():
            if getattr(instance, name, _MISSING) != value:
                return False
    return True


def turn_is_correct(
    *,
    ground_truth_empty: bool,
    calls_in_turn: int,
    cut_off: bool,
    state_ok: bool | None,
    responses_ok: bool | None,
) -> bool:
    """Combine the checks of one finished turn (state/response checks are unused when ground truth is empty)."""
    if cut_off:
        return False
    if ground_truth_empty:
        return calls_in_turn == 0
    return calls_in_turn > 0 and bool(state_ok) and bool(responses_ok)


def progress_reward(turn_correct: Sequence[bool], num_turns: int) -> float:
    """Correct turns / all turns of the entry; turns not reached count as incorrect."""
    if num_turns <= 0:
        raise ValueError(f"num_turns must be positive, got {num_turns}")
    if len(turn_correct) > num_turns:
        raise ValueError(f"{len(turn_correct)} turn results for an entry of {num_turns} turns")
    return sum(bool(c) for c in turn_correct) / num_turns


def binary_reward(turn_correct: Sequence[bool], num_turns: int) -> float:
    return 1.0 if len(turn_correct) == num_turns and all(turn_correct) else 0.0


# EnvTuning's reply classes for the stage-1 format reward (its interaction's per-round codes: -3 a reply that
# failed to parse, -1 tool calls that ran without error, -2 tool calls of which one reported an error; a reply
# without calls closes the turn and is a round too).
FORMAT_ERROR, TOOLS_OK, TOOLS_ERROR, ANSWER = "format_error", "tools_ok", "tools_error", "answer"
REPLY_CLASSES = (FORMAT_ERROR, TOOLS_OK, TOOLS_ERROR, ANSWER)


def format_reward(replies: Sequence[str]) -> float:
    """EnvTuning's stage-1 reward (env_tuning/bfcl_reward.py of the paper's code), in [0, 2]:
    is_tool_call * (format + tool_call) where format is the share of replies that parsed, tool_call the share of
    tool-call replies whose calls all ran without error, and is_tool_call whether any reply called a tool - so an
    episode that never calls a tool earns nothing however clean its text."""
    unknown = sorted(set(replies) - set(REPLY_CLASSES))
    if unknown:
        raise ValueError(f"unknown reply classes {unknown}; expected {REPLY_CLASSES}")
    if not replies:
        return 0.0
    ok, bad = replies.count(TOOLS_OK), replies.count(TOOLS_ERROR)
    if ok + bad == 0:
        return 0.0
    parsed = (len(replies) - replies.count(FORMAT_ERROR)) / len(replies)
    return parsed + ok / (ok + bad)


def select_reward(kind: str, *, progress: float, binary: float, format_score: float) -> float:
    if kind == "progress":
        return progress
    if kind == "binary":
        return binary
    if kind == "format":
        return format_score
    raise ValueError(f"unknown reward kind {kind!r}; expected one of {REWARD_KINDS}")
