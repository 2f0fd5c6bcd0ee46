"""Safe execution of tool calls on one episode's own instances of the bfcl-eval API classes.

A call runs only if its name is exactly a documented public method of one of the entry's classes and its arguments
are plain data within the size limits; nothing is ever `eval`ed. Beyond that, what bfcl-eval's executor would run
runs: ill-typed, missing or unexpected arguments go to the method as given, and Python's own error (the
TypeError a wrong signature raises, or the method's) is the result, exactly as in bfcl-eval. The schema check
still runs, but only to inform hints and the format score (`CallOutcome.problem`). Results are stringified exactly
as bfcl-eval's executor does, so reward checks compare the same strings.

Isolation: each environment builds fresh instances from a deep copy of the entry's config. In long-context mode
bfcl-eval's classes splice module-level data (e.g. TravelAPI's extra credit cards) into instance state by
reference, so those instances are deep-copied once more after loading. Process-wide settings a method may change
(decimal precision, mpmath precision) are restored after every call.
"""

from __future__ import annotations

import copy
import decimal
import functools
import importlib
import inspect
import json
import pickle
from dataclasses import dataclass
from typing import Any

import mpmath

from environments.bfcl import catalog
from environments.bfcl.arguments import ArgumentProblem, schema_problem, size_problem
from environments.bfcl.calls import Call, CallSyntaxError, to_call

from bfcl_eval.constants.executable_backend_config import (  # noqa: E402  (catalog set BFCL_PROJECT_ROOT)
    CLASS_FILE_PATH_MAPPING,
    STATELESS_CLASSES,
)

# Outcome kinds. "ok" and "tool_error" ran the method and it returned; "exception": it (or binding its arguments)
# raised; the others ran nothing ("bad_arguments": over the size limits).
OK, TOOL_ERROR, EXCEPTION, UNKNOWN_TOOL, BAD_ARGUMENTS, BAD_CALL = (
    "ok", "tool_error", "exception", "unknown_tool", "bad_arguments", "bad_call",
)
_ERROR_PREFIX = "Error during execution: "  # bfcl-eval's prefix for a call that raised


@dataclass(frozen=True)
class CallOutcome:
    """What one call did. `result` is the string bfcl-eval would return for it (what the model sees when
    augmentation is off, and what the response check compares)."""

    name: str
    result: str
    kind: str
    class_name: str | None = None
    error: str | None = None  # error text, for hints
    problem: ArgumentProblem | None = None  # what the schema check found (the call ran anyway, unless too large)

    @property
    def ran(self) -> bool:
        return self.kind in (OK, TOOL_ERROR)


@functools.lru_cache(maxsize=None)
def api_class(class_name: str) -> type:
    if class_name not in catalog.CLASS_NAMES:
        raise ValueError(f"unknown BFCL API class {class_name!r}; expected one of {catalog.CLASS_NAMES}")
    return getattr(importlib.import_module(CLASS_FILE_PATH_MAPPING[class_name]), class_name)


@dataclass(frozen=True)
class _Tool:
    class_name: str
    function: Any  # the plain function defined on the class; called with the instance
    signature: inspect.Signature  # without `self`
    parameters: dict  # JSON schema of the arguments object


@functools.lru_cache(maxsize=None)
def _class_tools(class_name: str) -> dict[str, _Tool]:
    cls = api_class(class_name)
    tools = {}
    for name in catalog.class_tool_names(class_name):
        function = cls.__dict__.get(name)
        if name.startswith("_") or not inspect.isfunction(function):
            raise ValueError(f"documented tool {class_name}.{name} is not a public method of the class")
        params = list(inspect.signature(function).parameters.values())[1:]
        tools[name] = _Tool(
            class_name,
            function,
            inspect.Signature(params),
            catalog.tool_schema(name)["function"]["parameters"],
        )
    return tools


def clone(value: Any) -> Any:
    """Deep copy. A pickle round trip copies this plain data and these classes ~7x faster than copy.deepcopy
    (same result: shared references inside the value stay shared); deepcopy remains the fallback."""
    try:
        return pickle.loads(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception:
        return copy.deepcopy(value)


def new_instance(class_name: str, initial_config: dict, long_context: bool) -> Any:
    """A fresh instance loaded like bfcl-eval does it, sharing no mutable data with anything else."""
    instance = api_class(class_name)()
    if class_name not in STATELESS_CLASSES:
        instance._load_scenario(clone(initial_config.get(class_name, {})), long_context=long_context)
        if long_context:
            instance = clone(instance)
    return instance


def stringify_result(result: Any) -> str:
    """bfcl-eval's rule: str as is, a plain dict as JSON (falling back to str), anything else via str()."""
    if type(result) is str:
        return result
    if type(result) is dict:
        try:
            return json.dumps(result)
        except Exception:
            return str(result)
    return str(result)


def _error_text(result: Any) -> str | None:
    """The error a method reported in its return value, if any (the classes signal errors in several shapes)."""
    if isinstance(result, dict):
        if "error" in result:
            return str(result["error"])
        if result.get("verification_status") is False:
            return str(result.get("verification_failure", ""))
    if isinstance(result, list) and len(result) == 1:
        item = result[0]
        if isinstance(item, dict) and "error" in item:
            return str(item["error"])
        if isinstance(item, str) and item.startswith("Error"):
            return item
    return None


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


@functools.lru_cache(maxsize=1024)  # ~5 KB per entry on average, 20 KB at most
def _pickled_initial_instances(entry_id: str) -> bytes:
    entry = catalog.load_entry(entry_id)
    instances = {name: new_instance(name, entry.initial_config, entry.long_context) for name in entry.involved_classes}
    return pickle.dumps(instances, protocol=pickle.HIGHEST_PROTOCOL)


class ToolEnvironment:
    """The API-class instances of one episode and the calls they accept."""

    def __init__(self, involved_classes: tuple[str, ...] | list[str], initial_config: dict, long_context: bool,
                 *, instances: dict[str, Any] | None = None):
        if instances is None:
            instances = {name: new_instance(name, initial_config, long_context) for name in involved_classes}
        self.instances: dict[str, Any] = instances
        self._tools: dict[str, _Tool] = {}
        for name in involved_classes:
            self._tools.update(_class_tools(name))

    @classmethod
    def for_entry(cls, entry: catalog.Entry) -> "ToolEnvironment":
        # Loading an entry's scenario once and unpickling a fresh copy per episode gives the same instances as
        # loading it every time, at about half the cost.
        instances = pickle.loads(_pickled_initial_instances(entry.id))
        return cls(entry.involved_classes, entry.initial_config, entry.long_context, instances=instances)

    @property
    def tool_names(self) -> list[str]:
        return list(self._tools)

    def execute(self, item: Any) -> CallOutcome:
        """Run one call (a `Call`, a BFCL call string or a `{"name", "arguments"}` object)."""
        try:
            call = to_call(item)
        except CallSyntaxError as e:
            return CallOutcome("", _ERROR_PREFIX + str(e), BAD_CALL, error=str(e))
        tool = self._tools.get(call.name)
        if tool is None:
            if call.name.isidentifier():
                message = f"name {_short(call.name)!r} is not defined"
            else:
                message = f"{_short(call.name)!r} is not a valid tool name"
            return CallOutcome(_short(call.name), _ERROR_PREFIX + message, UNKNOWN_TOOL, error=message)
        too_large = size_problem({"positional": list(call.positional), "named": call.arguments})
        if too_large is not None:
            return CallOutcome(call.name, _ERROR_PREFIX + too_large.message, BAD_ARGUMENTS, tool.class_name,
                               too_large.message, too_large)
        return self._run(call, tool, self._schema_problem(call, tool))

    @staticmethod
    def _schema_problem(call: Call, tool: _Tool) -> ArgumentProblem | None:
        arguments = call.arguments
        if call.positional:
            try:
                arguments = dict(tool.signature.bind(*call.positional, **call.arguments).arguments)
            except TypeError as e:
                return ArgumentProblem("unexpected", "", f"{call.name}(): {e}")
        return schema_problem(arguments, tool.parameters)  # sizes were checked before

    def _run(self, call: Call, tool: _Tool, problem: ArgumentProblem | None) -> CallOutcome:
        name = call.name
        instance = self.instances[tool.class_name]
        context = decimal.getcontext()
        saved_prec, saved_dps = context.prec, mpmath.mp.dps
        try:
            # Stringify inside the guard and before restoring precision, as bfcl-eval does: str() itself can fail
            # (e.g. ints past Python's digit limit) and mpmath/Decimal values print at the precision they carry.
            try:
                # As bfcl-eval's eval of `instance.name(...)` would: a bad signature raises Python's TypeError.
                value = tool.function(instance, *call.positional, **call.arguments)
                result = stringify_result(value)
            except Exception as e:
                message = str(e)
                return CallOutcome(name, _ERROR_PREFIX + message, EXCEPTION, tool.class_name, message, problem)
        finally:
            context.prec = saved_prec
            mpmath.mp.dps = saved_dps
        error = _error_text(value)
        return CallOutcome(name, result, TOOL_ERROR if error is not None else OK, tool.class_name, error, problem)

    def public_state(self) -> dict[str, dict[str, Any]]:
        """Live public attributes of every instance (what bfcl-eval's state check compares)."""
        return {
            name: {k: v for k, v in vars(inst).items() if not k.startswith("_")}
            for name, inst in self.instances.items()
        }

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return clone(self.public_state())


def named_call(item: Any) -> dict:
    """`{"name", "arguments"}` form of a call, positional arguments bound to names by the method's signature
    (e.g. ground truth `sort('a.txt')` -> {"name": "sort", "arguments": {"file_name": "a.txt"}})."""
    call = to_call(item)
    if not call.positional:
        return call.as_dict()
    class_name, _ = catalog.tool_doc(call.name)
    try:
        bound = _class_tools(class_name)[call.name].signature.bind(*call.positional, **call.arguments)
    except TypeError as e:
        raise CallSyntaxError(f"{call.name}(): {e}") from None
    return {"name": call.name, "arguments": dict(bound.arguments)}
