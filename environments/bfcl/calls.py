"""Tool calls: the `{"name", "arguments"}` form and BFCL's Python call strings, converted without evaluating.

A call string such as `cd(folder='x')` is parsed with `ast` and its arguments read with `ast.literal_eval`, so
nothing in it can run. Positional arguments (160 ground-truth calls use them) are kept apart; the executor binds
them to parameter names with the method's signature.
"""

from __future__ import annotations

import ast
import functools
import pickle
from dataclasses import dataclass, field
from typing import Any

MAX_CALL_STRING_CHARS = 100_000


class CallSyntaxError(ValueError):
    """A call string or call object that is not a single plain function call with literal arguments."""


@dataclass(frozen=True)
class Call:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    positional: tuple = ()

    def as_dict(self) -> dict:
        if self.positional:
            raise CallSyntaxError(f"call {self.name!r} has positional arguments; bind them before converting")
        return {"name": self.name, "arguments": dict(self.arguments)}


_SCALARS = (str, int, float, bool, type(None))


def parse_call_string(text: str) -> Call:
    """Parse one BFCL call string, e.g. `mv(source='a.txt', destination='b')`."""
    if not isinstance(text, str):
        raise CallSyntaxError(f"call string must be str, got {type(text).__name__}")
    if len(text) > MAX_CALL_STRING_CHARS:
        raise CallSyntaxError(f"call string of {len(text)} characters exceeds {MAX_CALL_STRING_CHARS}")
    parsed = _parse_cached(text)
    values = list(parsed.arguments.values()) + list(parsed.positional)
    if all(isinstance(v, _SCALARS) for v in values):
        return Call(parsed.name, dict(parsed.arguments), parsed.positional)
    # Methods may mutate list/dict arguments: every caller gets its own copy of the cached parse.
    arguments, positional = pickle.loads(pickle.dumps((parsed.arguments, parsed.positional)))
    return Call(parsed.name, arguments, positional)


@functools.lru_cache(maxsize=8192)  # ground-truth strings are parsed again for every episode of an entry
def _parse_cached(text: str) -> Call:
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise CallSyntaxError(f"not a Python call: {text[:200]!r} ({type(e).__name__})") from None
    node = tree.body
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise CallSyntaxError(f"expected a single call of a plain tool name, got {text[:200]!r}")
    try:
        positional = tuple(ast.literal_eval(a) for a in node.args)
        arguments = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise CallSyntaxError(f"'**' arguments are not allowed: {text[:200]!r}")
            if kw.arg in arguments:
                raise CallSyntaxError(f"argument {kw.arg!r} given twice: {text[:200]!r}")
            arguments[kw.arg] = ast.literal_eval(kw.value)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        raise CallSyntaxError(f"arguments must be literals: {text[:200]!r}") from None
    return Call(node.func.id, arguments, positional)


def call_from_object(obj: Any) -> Call:
    """`{"name": str, "arguments": dict}` (arguments may be omitted for tools without parameters) -> Call.

    Other keys (an "id", a "type") are ignored, as bfcl-eval's and T3RL's parsers ignore them."""
    if not isinstance(obj, dict):
        raise CallSyntaxError(f"a tool call must be an object with 'name' and 'arguments', got {type(obj).__name__}")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise CallSyntaxError(f"tool call 'name' must be a non-empty string, got {name!r}"[:300])
    arguments = obj.get("arguments", {})
    if not isinstance(arguments, dict):
        raise CallSyntaxError(f"'arguments' of {name!r} must be an object, got {type(arguments).__name__}"[:300])
    return Call(name, dict(arguments))


def to_call(item: Any) -> Call:
    """Accept a Call, a BFCL call string or a `{"name", "arguments"}` object."""
    if isinstance(item, Call):
        return item
    if isinstance(item, str):
        return parse_call_string(item)
    return call_from_object(item)


def format_call_string(name: str, arguments: dict[str, Any]) -> str:
    """The BFCL string form of a call; `repr` of JSON-like values is a valid Python literal."""
    if not name.isidentifier():
        raise CallSyntaxError(f"{name!r} is not a valid tool name")
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in arguments.items())})"
