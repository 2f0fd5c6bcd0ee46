"""BFCL multi-turn entries and tool schemas, read through bfcl-eval's own loader.

Entries are loaded once per process and cached; everything handed out is a deep copy or immutable so callers
cannot corrupt the cache.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import dataclass
from typing import Any

from environments.bfcl import project_root

project_root.ensure_bfcl_project_root()

from bfcl_eval.constants.default_prompts import DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_FC  # noqa: E402
from bfcl_eval.constants.executable_backend_config import MULTI_TURN_FUNC_DOC_FILE_MAPPING  # noqa: E402
from bfcl_eval.constants.eval_config import MULTI_TURN_FUNC_DOC_PATH  # noqa: E402
from bfcl_eval.utils import load_dataset_entry, load_ground_truth_entry  # noqa: E402

CATEGORIES = ("base", "miss_func", "miss_param", "long_context")
# The eight API classes of the multi-turn categories (bfcl-eval also lists web-search/memory classes we never use).
CLASS_NAMES = (
    "GorillaFileSystem",
    "MathAPI",
    "MessageAPI",
    "TwitterAPI",
    "TicketAPI",
    "TradingBot",
    "TravelAPI",
    "VehicleControlAPI",
)
# BFCL sends this user message at a miss_func turn whose question list is empty (the FC handlers' wording).
ADDED_FUNCTIONS_MESSAGE = DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_FC

_ID_RE = re.compile(r"^multi_turn_(base|miss_func|miss_param|long_context)_(\d+)$")
# BFCL's Python-flavoured types -> JSON-schema types used by the Qwen chat template's <tools> block.
_JSON_TYPE = {
    "dict": "object",
    "object": "object",
    "float": "number",
    "number": "number",
    "integer": "integer",
    "string": "string",
    "boolean": "boolean",
    "array": "array",
    "list": "array",
    "tuple": "array",
}


@dataclass(frozen=True)
class Entry:
    """One multi-turn task. `missed_function` maps a turn index to the tool names held back until that turn."""

    id: str
    category: str
    index: int
    question: tuple  # per turn: tuple of {"role", "content"} messages (empty at a miss_func reveal turn)
    initial_config: dict
    involved_classes: tuple[str, ...]
    ground_truth: tuple  # per turn: tuple of BFCL call strings
    missed_function: dict[int, tuple[str, ...]]

    @property
    def long_context(self) -> bool:
        # bfcl-eval switches its classes to long-context mode by category name.
        return self.category == "long_context"

    @property
    def num_turns(self) -> int:
        return len(self.ground_truth)

    def turn_messages(self, turn: int) -> list[dict]:
        """User messages that open `turn`; a miss_func reveal turn gets BFCL's "more functions" message."""
        if turn in self.missed_function:
            return [{"role": "user", "content": ADDED_FUNCTIONS_MESSAGE}]
        return [dict(m) for m in self.question[turn]]

    def tool_names_at(self, turn: int) -> list[str]:
        """Names of the tools visible during `turn` (held-back ones appear from their reveal turn on)."""
        hidden = {n for t, names in self.missed_function.items() if t > turn for n in names}
        names = [n for cls in self.involved_classes for n in class_tool_names(cls)]
        return [n for n in names if n not in hidden]


def parse_entry_id(entry_id: str) -> tuple[str, int]:
    """`multi_turn_base_3` -> ("base", 3)."""
    m = _ID_RE.match(entry_id) if isinstance(entry_id, str) else None
    if m is None:
        raise ValueError(f"unknown BFCL multi-turn entry id {entry_id!r} (expected multi_turn_<category>_<n>)")
    return m.group(1), int(m.group(2))


def _freeze_turns(turns: list[list]) -> tuple:
    return tuple(tuple(copy.deepcopy(t)) for t in turns)


@functools.lru_cache(maxsize=None)
def _category_entries(category: str) -> dict[str, Entry]:
    if category not in CATEGORIES:
        raise ValueError(f"unknown BFCL multi-turn category {category!r}; expected one of {CATEGORIES}")
    name = f"multi_turn_{category}"
    raw = load_dataset_entry(name, include_prereq=False, include_language_specific_hint=False)
    answers = {a["id"]: a["ground_truth"] for a in load_ground_truth_entry(name)}
    entries = {}
    for e in raw:
        _, index = parse_entry_id(e["id"])
        if len(answers[e["id"]]) != len(e["question"]):
            raise ValueError(f"{e['id']}: {len(e['question'])} question turns but {len(answers[e['id']])} answer turns")
        missed = {int(t): tuple(doc["name"] for doc in docs) for t, docs in e.get("missed_function", {}).items()}
        entries[e["id"]] = Entry(
            id=e["id"],
            category=category,
            index=index,
            question=_freeze_turns(e["question"]),
            initial_config=e.get("initial_config", {}),
            involved_classes=tuple(e["involved_classes"]),
            ground_truth=_freeze_turns(answers[e["id"]]),
            missed_function=missed,
        )
    return entries


def entry_ids(category: str) -> list[str]:
    """Entry ids of one category in numeric order."""
    return sorted(_category_entries(category), key=lambda i: parse_entry_id(i)[1])


def all_entry_ids() -> list[str]:
    return [i for c in CATEGORIES for i in entry_ids(c)]


def load_entry(entry_id: str) -> Entry:
    category, _ = parse_entry_id(entry_id)
    try:
        return _category_entries(category)[entry_id]
    except KeyError:
        raise ValueError(f"BFCL entry {entry_id!r} does not exist") from None


@functools.lru_cache(maxsize=None)
def class_tool_docs(class_name: str) -> tuple[dict, ...]:
    """bfcl-eval's raw tool docs (BFCL types, with `response`) for one API class."""
    if class_name not in CLASS_NAMES:
        raise ValueError(f"unknown BFCL API class {class_name!r}; expected one of {CLASS_NAMES}")
    path = MULTI_TURN_FUNC_DOC_PATH / MULTI_TURN_FUNC_DOC_FILE_MAPPING[class_name]
    with open(path, encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def class_tool_names(class_name: str) -> list[str]:
    return [d["name"] for d in class_tool_docs(class_name)]


@functools.lru_cache(maxsize=None)
def _tool_doc_index() -> dict[str, tuple[str, dict]]:
    index = {}
    for cls in CLASS_NAMES:
        for doc in class_tool_docs(cls):
            if doc["name"] in index:
                raise ValueError(f"tool name {doc['name']!r} is defined by {index[doc['name']][0]} and {cls}")
            index[doc["name"]] = (cls, doc)
    return index


def tool_doc(name: str) -> tuple[str, dict]:
    """(class name, raw BFCL doc) of a tool."""
    try:
        return _tool_doc_index()[name]
    except KeyError:
        raise ValueError(f"unknown BFCL tool {name!r}") from None


def _convert_property(prop: dict) -> dict:
    out = {}
    for key, value in prop.items():
        if key == "type":
            if value == "any":
                continue  # JSON schema has no "any"; omitting the type accepts every value
            if value not in _JSON_TYPE:
                raise ValueError(f"BFCL schema type {value!r} has no JSON-schema equivalent")
            out["type"] = _JSON_TYPE[value]
        elif key == "properties":
            out["properties"] = {k: _convert_property(v) for k, v in value.items()}
        elif key == "items":
            out["items"] = _convert_property(value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def to_json_schema_tool(doc: dict) -> dict:
    """A BFCL tool doc as the `{"type": "function", "function": {...}}` form of the Qwen `<tools>` block.

    The `response` schema is left out: the chat template would otherwise render it as part of the tool."""
    params = _convert_property(doc["parameters"])
    params["type"] = "object"
    params.setdefault("properties", {})
    params.setdefault("required", [])
    return {
        "type": "function",
        "function": {"name": doc["name"], "description": doc["description"], "parameters": params},
    }


@functools.lru_cache(maxsize=None)
def _schema_by_name() -> dict[str, dict]:
    return {name: to_json_schema_tool(doc) for name, (_, doc) in _tool_doc_index().items()}


def tool_schema(name: str) -> dict:
    tool_doc(name)  # clear error for unknown names
    return copy.deepcopy(_schema_by_name()[name])


def class_tool_schemas(class_name: str) -> list[dict]:
    return [tool_schema(n) for n in class_tool_names(class_name)]


@functools.lru_cache(maxsize=4096)
def _tool_schemas_json(names: tuple[str, ...]) -> str:
    return json.dumps([_schema_by_name()[n] for n in names])


def tool_schemas_json_at(entry: Entry, turn: int) -> str:
    """`tool_schemas_at` as a JSON string."""
    return _tool_schemas_json(tuple(entry.tool_names_at(turn)))


def tool_schemas_at(entry: Entry, turn: int) -> list[dict]:
    """JSON-schema tools visible during `turn` of `entry` (a fresh copy: parsing cached JSON is the cheap way)."""
    return json.loads(tool_schemas_json_at(entry, turn))


def entry_record(entry: Entry) -> dict[str, Any]:
    """The entry as plain JSON-able data (the `bfcl_task` block of split files)."""
    return {
        "id": entry.id,
        "initial_config": copy.deepcopy(entry.initial_config),
        "involved_classes": list(entry.involved_classes),
        "ground_truth": [list(t) for t in entry.ground_truth],
        "question": [[dict(m) for m in t] for t in entry.question],
        "missed_function": {str(t): list(n) for t, n in entry.missed_function.items()},
    }
