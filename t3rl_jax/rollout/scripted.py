"""Ground-truth scripts: assistant replies that replay a BFCL entry's ground truth, for teacher-forced rollouts.

Used to check the whole rollout path (engine, driver, chat deltas, environments, scoring) end to end: replaying the
ground truth must score every turn correct. Turn t's first reply carries all of that turn's ground-truth calls;
the next reply (and the first reply of a turn whose ground truth is empty) is plain text, which ends the turn.
`wrong_argument_reply` is the same script with one argument value wrong in every call: the noisy demonstrations
of a warm start (`warm_start.wrong_argument_replays`).
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


def wrong_value(value):
    """A wrong value of the same type as a ground-truth argument: numbers + 1, booleans negated, strings reversed
    (extended when reversing leaves them as they were), a list or dict with its first item made wrong."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value[::-1] if value[::-1] != value else value + "x"
    if isinstance(value, list) and value:
        return [wrong_value(value[0])] + value[1:]
    if isinstance(value, dict) and value:
        key = next(iter(value))
        return {**value, key: wrong_value(value[key])}
    return value


def wrong_argument_reply(entry_id: str, turn: int, step_in_turn: int) -> dict:
    """`ground_truth_reply` with each call's first argument given a `wrong_value` (calls without arguments as
    they are): the same replies in the same places, wrong exactly where the ground truth's values go."""
    reply = ground_truth_reply(entry_id, turn, step_in_turn)
    calls = []
    for call in reply.get("tool_calls") or ():
        arguments = dict(call["arguments"])
        if arguments:
            first = next(iter(arguments))
            arguments[first] = wrong_value(arguments[first])
        calls.append({"name": call["name"], "arguments": arguments})
    return {**reply, "tool_calls": calls} if calls else reply
