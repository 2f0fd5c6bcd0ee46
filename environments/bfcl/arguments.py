"""Tool-call arguments: the size limits a call must meet to run at all, and the check against the tool's schema.

Pure functions. Each returns the first problem found (or None) as an `ArgumentProblem`. Only `size_problem` stops a
call (a resource limit: bfcl-eval itself would run any size); schema problems never stop one, because bfcl-eval
runs ill-typed calls and so must we. They feed the augmentation hint and the format score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Bounds on what a model may pass: ground-truth arguments are at most a few hundred characters and 3 levels deep.
# Far above what a reply can carry in practice; they bound the memory and recursion of copying and pickling.
MAX_DEPTH = 16
MAX_STRING_CHARS = 100_000
MAX_TOTAL_VALUES = 10_000

_PY_TYPES = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list, tuple),
    "object": (dict,),
}


@dataclass(frozen=True)
class ArgumentProblem:
    kind: str  # "unexpected" | "missing" | "type" | "too_large" | "too_deep"
    param: str  # dotted path of the offending argument ("" for the whole call)
    message: str
    expected: str = ""  # JSON type expected, for "missing" / "type"


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    if value is None:
        return "null"
    return type(value).__name__


def _preview(value: Any, limit: int = 60) -> str:
    # The offending value goes into the message so that different wrong calls give different results, as the
    # methods' own errors do.
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _matches_type(value: Any, json_type: str) -> bool:
    if json_type not in _PY_TYPES:
        raise ValueError(f"schema type {json_type!r} is not supported")
    # bool is an int subclass in Python; JSON keeps them apart.
    if isinstance(value, bool) and json_type != "boolean":
        return False
    return isinstance(value, _PY_TYPES[json_type])


def size_problem(arguments: Any) -> ArgumentProblem | None:
    """A call whose arguments break the size limits does not run."""
    # Iterative walk: a deeply nested value must not exhaust the interpreter stack here.
    stack = [(arguments, 0)]
    count = 0
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > MAX_TOTAL_VALUES:
            return ArgumentProblem("too_large", "", f"arguments hold more than {MAX_TOTAL_VALUES} values")
        if depth > MAX_DEPTH:
            return ArgumentProblem("too_deep", "", f"arguments are nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, str) and len(value) > MAX_STRING_CHARS:
            return ArgumentProblem("too_large", "", f"a string argument exceeds {MAX_STRING_CHARS} characters")
        if isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str):
                    return ArgumentProblem("type", "", f"object keys must be strings, got {_type_name(k)}")
                if len(k) > MAX_STRING_CHARS:
                    return ArgumentProblem("too_large", "", f"an object key exceeds {MAX_STRING_CHARS} characters")
                stack.append((v, depth + 1))
        elif isinstance(value, (list, tuple)):
            stack.extend((v, depth + 1) for v in value)
    return None


def _value_problem(value: Any, schema: dict, path: str) -> ArgumentProblem | None:
    json_type = schema.get("type")
    if json_type is None:
        return None  # BFCL "any"
    if not _matches_type(value, json_type):
        return ArgumentProblem(
            "type", path, f"argument '{path}' must be of type {json_type}, got {_type_name(value)} {_preview(value)}",
            json_type,
        )
    if json_type == "array" and "items" in schema:
        for i, item in enumerate(value):
            problem = _value_problem(item, schema["items"], f"{path}[{i}]")
            if problem:
                return problem
    if json_type == "object" and "properties" in schema:
        # Unknown keys inside an object argument are the method's business (e.g. edit_ticket reports them).
        for key, item in value.items():
            if key in schema["properties"]:
                problem = _value_problem(item, schema["properties"][key], f"{path}.{key}")
                if problem:
                    return problem
    return None


def check_arguments(arguments: Any, parameters: dict) -> ArgumentProblem | None:
    """First problem of `arguments` (size limits, then the `parameters` object schema of a tool), or None."""
    if not isinstance(arguments, dict):
        return ArgumentProblem("type", "", f"arguments must be an object, got {_type_name(arguments)}", "object")
    return size_problem(arguments) or schema_problem(arguments, parameters)


def schema_problem(arguments: dict, parameters: dict) -> ArgumentProblem | None:
    """First problem of `arguments` (within the size limits) against the `parameters` object schema, or None.

    Optional parameters may be null (the method then sees None, as with a Python default of None)."""
    properties = parameters.get("properties", {})
    required = parameters.get("required", [])
    for name in arguments:
        if name not in properties:
            return ArgumentProblem("unexpected", name, f"unexpected argument '{name}'")
    for name in required:
        if name not in arguments:
            expected = properties.get(name, {}).get("type", "")
            return ArgumentProblem("missing", name, f"missing required argument '{name}'", expected)
    for name, value in arguments.items():
        if value is None and name not in required:
            continue
        problem = _value_problem(value, properties[name], name)
        if problem:
            return problem
    return None
