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


def reply_format_score(*, parse_error: bool, calls: int, well_formed_calls: int, turn_needs_tools: bool,
                       called_earlier_in_turn: bool) -> float:
    """Syntax score of one assistant reply for curriculum stage 1.

    A reply that failed to parse scores 0; a reply with calls scores the share of well-formed ones (known tool,
    valid arguments). A reply without calls ends the turn: it scores 1 unless the turn needs tools and none were
    called, so that never calling cannot earn a perfect format reward."""
    if parse_error:
        return 0.0
    if calls:
        return well_formed_calls / calls
    return 0.0 if turn_needs_tools and not called_earlier_in_turn else 1.0


def format_reward(reply_scores: Sequence[float]) -> float:
    return sum(reply_scores) / len(reply_scores) if reply_scores else 0.0


def select_reward(kind: str, *, progress: float, binary: float, format_score: float) -> float:
    if kind == "progress":
        return progress
    if kind == "binary":
        return binary
    if kind == "format":
        return format_score
    raise ValueError(f"unknown reward kind {kind!r}; expected one of {REWARD_KINDS}")
