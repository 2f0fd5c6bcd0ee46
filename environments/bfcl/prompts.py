"""Prompt styles: the system prompt, the tool docs and the miss_func reveal message an episode shows the model.

`t3rl`   T3RL's recipe: our own system prompt stating what T3RL's prompt requires, tool docs as bfcl-eval's
         `convert_to_tool` makes them (each function's `response` schema kept, float parameters marked), and at a
         reveal turn a user message with the revealed raw BFCL docs as JSON before bfcl-eval's sentence.
`bfcl`   bfcl-eval's own protocol for Qwen FC models (its `QwenFCHandler`, an OSS handler, so multi-turn runs its
         prompting path): no system prompt, the loader's function docs (raw BFCL docs with its Python-syntax note)
         in the chat template's tools block, and at a reveal turn its prompting reveal message.

In both styles the tool list stays the one of the first turn: a revealed tool reaches the model only through the
reveal message (this is what both anchors do; the KV cache of the tools block stays valid).

Everything bfcl-eval decides is read from the installed package at run time. `convert_to_tool` lives in a module
that imports tree-sitter parsers we do not install (bfcl-eval is installed with --no-deps), so its two functions
are compiled from that module's source, after checking they use nothing but the names we provide.
"""

from __future__ import annotations

import copy
import functools
import json

from environments.bfcl import catalog

from bfcl_eval.constants.default_prompts import (  # noqa: E402  (catalog set BFCL_PROJECT_ROOT)
    DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_FC,
    DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_PROMPTING,
)
from bfcl_eval.constants.enums import ModelStyle  # noqa: E402
from bfcl_eval.constants.type_mappings import GORILLA_TO_OPENAPI  # noqa: E402
from bfcl_eval.utils import (  # noqa: E402
    add_language_specific_hint_to_function_doc,
    populate_test_cases_with_predefined_functions,
)

STYLES = ("t3rl", "bfcl")
DEFAULT_STYLE = "t3rl"

# Our wording of what T3RL's system prompt asks for: reasoning inside thinking tags before acting, calls as
# <tool_call> JSON, a plain answer when no call fits, and no further calls meaning the turn is done.
T3RL_SYSTEM_PROMPT = (
    "You are an assistant that completes the user's requests by calling the functions provided to you.\n"
    "Before acting, reason step by step inside <thinking></thinking> tags about what the request needs and "
    "what the previous results tell you.\n"
    "To call functions, write each call as a JSON object with the function name and its arguments inside "
    "<tool_call></tool_call> tags; you may make several calls in one reply.\n"
    "If no function can do what is asked, or a required value is missing, do not call anything: answer in "
    "plain text and say what is missing.\n"
    "When you make no more function calls, the current request is considered complete and the next one follows."
)


class UnknownPromptStyle(ValueError):
    pass


def check_style(style: str) -> str:
    if style not in STYLES:
        raise UnknownPromptStyle(f"prompt.style: unknown prompt style {style!r}; known styles: {list(STYLES)}")
    return style


# ---- bfcl-eval's pieces, read at run time ----------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _convert_to_tool():
    # Imported lazily: its module pulls in bfcl-eval's Java/JavaScript parsers (tree-sitter), which only this
    # conversion needs.
    from bfcl_eval.model_handler.utils import convert_to_tool

    return convert_to_tool


@functools.lru_cache(maxsize=None)
def _class_docs(class_name: str) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """bfcl-eval's loader on an entry of this one class, per tool name as JSON: the raw doc, the doc with the
    loader's language note (what the bfcl style shows) and `convert_to_tool`'s form of the raw doc (t3rl).

    An entry's docs are its classes' docs in order minus the held-back ones, and both the note and the conversion
    treat each doc on its own, so entries are assembled from these (tests check every entry against bfcl-eval's
    full loader). Building them per entry cost ~10 ms an episode."""
    # Any multi-turn id: the loader picks the note by category and every multi-turn category gets Python's.
    test_entry = {"id": "multi_turn_base_0", "involved_classes": [class_name]}
    populate_test_cases_with_predefined_functions([test_entry])
    plain = copy.deepcopy(test_entry["function"])
    add_language_specific_hint_to_function_doc([test_entry])
    converted = _convert_to_tool()(plain, GORILLA_TO_OPENAPI, ModelStyle.OPENAI_COMPLETIONS)
    return ({d["name"]: json.dumps(d) for d in plain},
            {d["name"]: json.dumps(d) for d in test_entry["function"]},
            {t["function"]["name"]: json.dumps(t) for t in converted})


_RAW, _WITH_NOTE, _CONVERTED = 0, 1, 2


def preload() -> None:
    """Build every class's docs now (a worker's warmup), so that no episode pays for it."""
    for class_name in catalog.CLASS_NAMES:
        _class_docs(class_name)


def _docs_json(names, form: int) -> str:
    # json.dumps of a list joins its items with ", ": the same text as dumping the list of docs.
    return "[" + ", ".join(_class_docs(catalog.tool_doc(n)[0])[form][n] for n in names) + "]"


# ---- what an episode shows ---------------------------------------------------------------------------------------
def tools_json(entry: catalog.Entry, style: str) -> str:
    """The tool docs of the whole episode in `style`, as JSON (cheap to send across a pipe)."""
    form = _WITH_NOTE if check_style(style) == "bfcl" else _CONVERTED
    return _docs_json(entry.tool_names_at(0), form)


def tools(entry: catalog.Entry, style: str) -> list[dict]:
    return json.loads(tools_json(entry, style))


def system_messages(style: str) -> list[dict]:
    if check_style(style) == "t3rl":
        return [{"role": "system", "content": T3RL_SYSTEM_PROMPT}]
    return []


def first_messages(entry: catalog.Entry, style: str) -> list[dict]:
    """System prompt (if the style has one) and the user messages of turn 0."""
    return system_messages(style) + turn_messages(entry, 0, style)


def raw_revealed_docs(entry: catalog.Entry, turn: int) -> list[dict]:
    """bfcl-eval's raw docs of the tools held back until `turn` ([] on other turns)."""
    return json.loads(_docs_json(entry.missed_function.get(turn, ()), _RAW))


def revealed_tools(entry: catalog.Entry, turn: int, style: str) -> list[dict]:
    """The tools revealed at `turn`, in the form of the style's tool docs ([] on other turns)."""
    form = _RAW if check_style(style) == "bfcl" else _CONVERTED
    return json.loads(_docs_json(entry.missed_function.get(turn, ()), form))


def turn_messages(entry: catalog.Entry, turn: int, style: str) -> list[dict]:
    """User messages that open `turn`; at a miss_func reveal turn, the style's reveal message."""
    check_style(style)
    if turn not in entry.missed_function:
        return entry.turn_messages(turn)
    docs = raw_revealed_docs(entry, turn)
    if style == "bfcl":
        content = DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_PROMPTING.format(functions=docs)
    else:
        content = json.dumps(docs) + "\n" + DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_FC
    return [{"role": "user", "content": content}]
