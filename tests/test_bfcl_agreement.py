"""Our per-turn correctness against bfcl-eval's own multi-turn checker on thousands of damaged trajectories.

Every trajectory is built from ground-truth call strings (dropped, duplicated, reordered, an argument changed to
another valid value or to an ill-typed one, an argument dropped or an unexpected one added, a wrong call added, a
turn truncated), so bfcl-eval's `eval` only ever sees strings this test generated. Ill-typed calls run in both
executors (bfcl-eval runs them, so ours must).

bfcl-eval's `multi_turn_checker` stops at the first failing turn, so it is compared two ways:
  * itself, on every prefix of turns: valid(prefix k) must equal "all our turns <= k with ground truth correct";
  * its own building blocks (executor, `state_checker`, `response_checker`, `is_empty_execute_response`) composed
    as the checker composes them but without stopping, which gives bfcl's verdict on every turn.
"""

from __future__ import annotations

import itertools
import random

import pytest

from environments.bfcl import catalog
from environments.bfcl.calls import format_call_string, parse_call_string
from environments.bfcl.episode import Episode

from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_checker as bfcl_checker
from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_utils as bfcl_utils

NUM_TRAJECTORIES = 2400
_names = itertools.count()


# ---- damage -------------------------------------------------------------------------------------------------
def _ill_typed_value(value, rng: random.Random):
    """A value of another JSON type than `value` (what a model gets wrong: numbers as strings, a list as a string,
    null for a required value)."""
    if isinstance(value, bool):
        return rng.choice([str(value).lower(), int(value), None])
    if isinstance(value, (int, float)):
        return rng.choice([str(value), [value], None, True])
    if isinstance(value, str):
        return rng.choice([len(value), [value], {"value": value}, None, 3.5])
    if isinstance(value, list):
        return rng.choice([", ".join(map(str, value)), value[0] if value else 0, None])
    if isinstance(value, dict):
        return rng.choice([str(value), list(value.values()), None])
    return 0


def _changed_value(value, rng: random.Random):
    if rng.random() < 0.4:
        return _ill_typed_value(value, rng)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + rng.choice([1, -1, 7])
    if isinstance(value, float):
        return round(value + rng.choice([0.5, -1.25, 10.0]), 2)
    if isinstance(value, str):
        return rng.choice([value + "_x", value.upper() if value != value.upper() else value.lower() + "q", "temp"])
    if isinstance(value, list):
        return value[:-1] if value and rng.random() < 0.5 else list(reversed(value)) + value[:1]
    if isinstance(value, dict):
        return {k: _changed_value(v, rng) for k, v in value.items()}
    return value


def _change_argument(call: str, rng: random.Random) -> str:
    parsed = parse_call_string(call)
    if parsed.positional:
        return call
    arguments = dict(parsed.arguments)
    how = rng.random()
    if how < 0.15:  # an argument the method does not take
        arguments[rng.choice(["path", "verbose", "folder_name"])] = "x"
    elif not arguments:
        return call
    elif how < 0.3:  # a required or optional argument left out
        del arguments[rng.choice(sorted(arguments))]
    else:
        key = rng.choice(sorted(arguments))
        arguments[key] = _changed_value(arguments[key], rng)
    return format_call_string(parsed.name, arguments)


def _damage_turn(calls: list[str], pool: list[str], rng: random.Random) -> list[str]:
    calls = list(calls)
    op = rng.choice(["drop", "duplicate", "reorder", "change", "add", "truncate"])
    if op == "drop" and calls:
        del calls[rng.randrange(len(calls))]
    elif op == "duplicate" and calls:
        i = rng.randrange(len(calls))
        calls.insert(i, calls[i])
    elif op == "reorder":
        rng.shuffle(calls)
    elif op == "change" and calls:
        i = rng.randrange(len(calls))
        calls[i] = _change_argument(calls[i], rng)
    elif op == "add" and pool:
        calls.insert(rng.randrange(len(calls) + 1), rng.choice(pool))
    elif op == "truncate":
        calls = calls[: rng.randrange(len(calls) + 1)]
    return calls


def _split_steps(calls: list[str], rng: random.Random) -> list[list[str]]:
    steps = []
    while calls:
        n = rng.randint(1, len(calls))
        steps.append(calls[:n])
        calls = calls[n:]
    return steps


def damaged_trajectory(entry: catalog.Entry, rng: random.Random) -> list[list[list[str]]]:
    """Turns -> steps -> call strings; every turn is damaged with probability 0.35."""
    pool = [c for turn in entry.ground_truth for c in turn]
    turns = []
    for calls in entry.ground_truth:
        calls = list(calls)
        if rng.random() < 0.35:
            calls = _damage_turn(calls, pool, rng)
        turns.append(_split_steps(calls, rng))
    return turns


# ---- the three scorers ----------------------------------------------------------------------------------------
def ours(entry: catalog.Entry, turns) -> list[bool]:
    episode = Episode(entry.id)
    for steps in turns:
        for step in steps:
            episode.step(step)
        episode.end_turn()
    return episode.turn_correct


def _test_entry(entry: catalog.Entry) -> dict:
    return {"id": entry.id, "initial_config": entry.initial_config, "involved_classes": list(entry.involved_classes)}


def _forget_bfcl_instances(model_name: str) -> None:
    # bfcl-eval caches instances in its module globals by model name and never frees them.
    for key in [k for k in vars(bfcl_utils) if k.startswith(model_name + "_")]:
        del vars(bfcl_utils)[key]


def bfcl_prefix_verdicts(entry: catalog.Entry, turns) -> list[bool]:
    """multi_turn_checker's verdict on each prefix of turns (fresh instances for every call)."""
    verdicts = []
    ground_truth = [list(t) for t in entry.ground_truth]
    for k in range(1, entry.num_turns + 1):
        name = f"agree{next(_names)}"
        result = bfcl_checker.multi_turn_checker(turns[:k], ground_truth[:k], _test_entry(entry), entry.category, name)
        _forget_bfcl_instances(name)
        verdicts.append(result["valid"])
    return verdicts


def bfcl_turn_verdicts(entry: catalog.Entry, turns) -> list[bool | None]:
    """Per-turn verdict from bfcl-eval's executor and sub-checkers, composed like multi_turn_checker.
    None for turns the checker skips (empty ground truth)."""
    name = f"agree{next(_names)}"
    kwargs = dict(initial_config=entry.initial_config, involved_classes=list(entry.involved_classes),
                  test_entry_id=entry.id, long_context=entry.long_context, is_evaL_run=True)
    all_results, verdicts = [], []
    model_instances = {}
    for steps, ground_truth in zip(turns, entry.ground_truth):
        for step in steps:
            results, model_instances = bfcl_utils.execute_multi_turn_func_call(step, model_name=name, **kwargs)
            all_results.extend(results)
        gt_results, gt_instances = bfcl_utils.execute_multi_turn_func_call(
            list(ground_truth), model_name=name + "_ground_truth", **kwargs)
        if not ground_truth:
            verdicts.append(None)
            continue
        if not steps or bfcl_utils.is_empty_execute_response(steps):
            verdicts.append(False)
            continue
        ok = bfcl_checker.state_checker(model_instances, gt_instances)["valid"]
        ok = ok and bfcl_checker.response_checker(all_results, gt_results, 0)["valid"]
        verdicts.append(ok)
    _forget_bfcl_instances(name)
    return verdicts


# ---- tests ------------------------------------------------------------------------------------------------------
def _sample_entries(rng: random.Random) -> list[catalog.Entry]:
    ids = catalog.all_entry_ids()
    return [catalog.load_entry(rng.choice(ids)) for _ in range(NUM_TRAJECTORIES)]


@pytest.mark.slow
def test_per_turn_verdicts_agree_with_bfcl_checker_on_damaged_trajectories():
    rng = random.Random(1234)
    compared = disagreements = damaged_wrong = 0
    examples = []
    for i, entry in enumerate(_sample_entries(rng)):
        turns = damaged_trajectory(entry, rng)
        mine = ours(entry, turns)
        theirs = bfcl_turn_verdicts(entry, turns)
        for t, (a, b) in enumerate(zip(mine, theirs)):
            if b is None:
                # Checker skips these; ours: correct iff no call was made.
                assert a == (not any(turns[t])), (entry.id, t)
                continue
            compared += 1
            damaged_wrong += not b
            if a != b:
                disagreements += 1
                examples.append((entry.id, t, a, b, turns))
        if i % 4 == 0:  # the full checker on every prefix, for a quarter of the trajectories
            prefix = bfcl_prefix_verdicts(entry, turns)
            running = True
            for t, ok in enumerate(mine):
                if entry.ground_truth[t]:
                    running = running and ok
                assert prefix[t] == running, (entry.id, t, mine, prefix, turns)
    assert disagreements == 0, examples[:3]
    assert compared > 5000
    # The damage must actually break turns, or agreement would be trivial.
    assert 0.15 * compared < damaged_wrong < 0.85 * compared, (damaged_wrong, compared)
