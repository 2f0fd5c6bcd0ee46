"""Ground-truth scripts: assistant replies that replay a BFCL entry's ground truth, for teacher-forced rollouts.

Used to check the whole rollout path (engine, driver, chat deltas, environments, scoring) end to end: replaying the
ground truth must score every turn correct. Turn t's first reply carries all of that turn's ground-truth calls;
the next reply (and the first reply of a turn whose ground truth is empty) is plain text, which ends the turn.
"""

from __future__ import annotations

import functools
import inspect

from environments.bfcl import catalog, executor
from environments.bfcl.calls import parse_call_string

FINAL_TEXT = "I have completed the requested task."


@functools.lru_cache(maxsize=None)
def _signature(tool_name: str) -> inspect.Signature:
    class_name, _ = catalog.tool_doc(tool_name)
    function = getattr(executor.api_class(class_name), tool_name)
    params = list(inspect.signature(function).parameters.values())[1:]  # drop self
    return inspect.Signature(params)


def named_call(call_string: str) -> dict:
    """BFCL call string -> {"name", "arguments"} with positional arguments bound to their parameter names."""
    call = parse_call_string(call_string)
    arguments = dict(call.arguments)
    if call.positional:
        arguments = dict(_signature(call.name).bind(*call.positional, **arguments).arguments)
    return {"name": call.name, "arguments": arguments}


def ground_truth_reply(entry_id: str, turn: int, step_in_turn: int) -> dict:
    entry = catalog.load_entry(entry_id)
    calls = entry.ground_truth[turn] if turn < entry.num_turns else ()
    if step_in_turn == 0 and calls:
        return {"role": "assistant", "content": None, "tool_calls": [named_call(c) for c in calls]}
    return {"role": "assistant", "content": FINAL_TEXT}
