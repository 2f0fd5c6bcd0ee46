"""bfcl-eval's own verdict on our episodes: its `multi_turn_checker` run on the call strings our environments ran.

Runs in a child process (see `check_entries`): bfcl-eval keeps every instance it creates in module globals and
`eval`s call strings, so it never shares a process with training or with the environments. Only strings this
module has rebuilt from parsed JSON reach it (`safe_call_string`): a known tool name, identifier keywords and
JSON literal values, so what bfcl-eval evaluates is a plain call with literal arguments.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import multiprocessing
from typing import Any

_names = itertools.count()


def _is_json_literal(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, list):
        return all(_is_json_literal(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json_literal(v) for k, v in value.items())
    return False


def safe_call_string(name: str, arguments: Any, known_tools: set[str]) -> str | None:
    """`name(k=v, ...)` for a known tool with identifier keywords and JSON values; None for anything else (bfcl-eval
    would only answer it with an error, which leaves state and the response check unchanged)."""
    if name not in known_tools or not isinstance(arguments, dict):
        return None
    if not all(isinstance(k, str) and k.isidentifier() for k in arguments) or not _is_json_literal(arguments):
        return None
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in arguments.items())})"


def _forget_instances(model_name: str) -> None:
    from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_utils

    for key in [k for k in vars(multi_turn_utils) if k.startswith(model_name + "_")]:
        del vars(multi_turn_utils)[key]


def prefix_verdicts(entry_id: str, turns: list[list[list[str]]]) -> list[bool]:
    """multi_turn_checker's `valid` on each prefix of the entry's turns (it stops at the first failing turn, so the
    prefixes give its verdict turn by turn); fresh bfcl-eval instances for each call."""
    from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_checker as checker

    from environments.bfcl import catalog

    entry = catalog.load_entry(entry_id)
    ground_truth = [list(t) for t in entry.ground_truth]
    test_entry = {"id": entry.id, "initial_config": entry.initial_config,
                  "involved_classes": list(entry.involved_classes)}
    turns = list(turns) + [[] for _ in range(entry.num_turns - len(turns))]
    verdicts = []
    for k in range(1, entry.num_turns + 1):
        name = f"t3rlcheck{next(_names)}"
        try:
            result = checker.multi_turn_checker(turns[:k], ground_truth[:k], test_entry, entry.category, name)
        finally:
            _forget_instances(name)
        verdicts.append(bool(result["valid"]))
    return verdicts


def _check_many(items: list[tuple[str, list]]) -> list[list[bool]]:
    return [prefix_verdicts(entry_id, turns) for entry_id, turns in items]


def check_entries(items: list[tuple[str, list[list[list[str]]]]], *, chunk: int = 25) -> list[list[bool]]:
    """prefix_verdicts for every (entry_id, turns), computed in one spawned child process."""
    if not items:
        return []
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as executor:
        return [v for part in executor.map(_check_many, chunks) for v in part]
