"""Prompt styles against what they claim to be: bfcl-eval's own loader and Qwen FC prompt, and T3RL's form."""

from __future__ import annotations

import functools
import json

import pytest

from environments.bfcl import catalog, prompts
from environments.bfcl.episode import Episode
from t3rl_jax import config_checks
from t3rl_jax.chat_format import render_conversation

from bfcl_eval.constants.default_prompts import (
    DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_FC,
    DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_PROMPTING,
)
from bfcl_eval.constants.enums import ModelStyle
from bfcl_eval.constants.type_mappings import GORILLA_TO_OPENAPI
from bfcl_eval.utils import load_dataset_entry

# One entry per category, plus miss_func entries with reveal turns at different places.
ENTRIES = ["multi_turn_base_0", "multi_turn_miss_func_0", "multi_turn_miss_func_57", "multi_turn_miss_param_9",
           "multi_turn_long_context_120"]


@functools.lru_cache(maxsize=None)
def _bfcl_loader(category: str, note: bool) -> dict[str, dict]:
    """Entries as bfcl-eval's generation pipeline loads them (the whole category; with or without its notes)."""
    entries = load_dataset_entry(f"multi_turn_{category}", include_prereq=False, include_language_specific_hint=note)
    return {e["id"]: e for e in entries}


def _bfcl_loader_entry(entry_id: str, note: bool = True) -> dict:
    return _bfcl_loader(catalog.load_entry(entry_id).category, note)[entry_id]


@functools.lru_cache(maxsize=1)
def _convert_to_tool():
    return prompts._convert_to_tool()


@pytest.mark.slow
def test_every_entrys_docs_are_bfcl_evals_own():
    converted = 0
    for entry_id in catalog.all_entry_ids():
        entry, theirs = catalog.load_entry(entry_id), _bfcl_loader_entry(entry_id)
        assert prompts.tools_json(entry, "bfcl") == json.dumps(theirs["function"]), entry_id
        for turn, docs in theirs.get("missed_function", {}).items():
            assert prompts.raw_revealed_docs(entry, int(turn)) == docs, (entry_id, turn)
        if entry.index % 4 == 0:  # convert_to_tool deep-copies every doc: a quarter of the entries suffices
            plain = _bfcl_loader_entry(entry_id, note=False)["function"]
            expected = _convert_to_tool()(plain, GORILLA_TO_OPENAPI, ModelStyle.OPENAI_COMPLETIONS)
            assert prompts.tools(entry, "t3rl") == expected, entry_id
            converted += 1
    assert converted == 200


def _qwen_fc_format_prompt():
    """bfcl-eval's own `QwenFCHandler._format_prompt` (it reads nothing of the handler's state)."""
    from bfcl_eval.model_handler.local_inference.qwen_fc import QwenFCHandler

    return lambda messages, function: QwenFCHandler._format_prompt(None, messages, function)


@pytest.mark.parametrize("entry_id", ENTRIES)
def test_bfcl_style_is_bfcl_evals_loader_and_qwen_fc_prompt(entry_id):
    entry = catalog.load_entry(entry_id)
    theirs = _bfcl_loader_entry(entry_id)
    assert prompts.tools(entry, "bfcl") == theirs["function"]
    assert prompts.first_messages(entry, "bfcl") == theirs["question"][0]  # no system prompt
    format_prompt = _qwen_fc_format_prompt()
    messages = prompts.first_messages(entry, "bfcl")
    tools = prompts.tools(entry, "bfcl")
    assert render_conversation(messages, tools, add_generation_prompt=True) == format_prompt(messages, tools)
    for turn in range(1, entry.num_turns):
        opening = prompts.turn_messages(entry, turn, "bfcl")
        if str(turn) in theirs.get("missed_function", {}):
            expected = DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_PROMPTING.format(
                functions=theirs["missed_function"][str(turn)])
            assert opening == [{"role": "user", "content": expected}]
            assert prompts.revealed_tools(entry, turn, "bfcl") == theirs["missed_function"][str(turn)]
        else:
            assert opening == theirs["question"][turn]
        # The whole conversation so far renders as bfcl-eval renders it (tool list unchanged at reveal turns).
        messages = messages + [{"role": "assistant", "content": "Done."}] + opening
        assert render_conversation(messages, tools, add_generation_prompt=True) == format_prompt(messages, tools)


@pytest.mark.parametrize("entry_id", ENTRIES)
def test_t3rl_style_tool_docs_keep_response_schemas_and_float_notes(entry_id):
    entry = catalog.load_entry(entry_id)
    tools = prompts.tools(entry, "t3rl")
    assert [t["function"]["name"] for t in tools] == entry.tool_names_at(0)
    raw = {d["name"]: d for cls in entry.involved_classes for d in catalog.class_tool_docs(cls)}
    floats = 0
    for tool in tools:
        assert tool["type"] == "function"
        function, doc = tool["function"], raw[tool["function"]["name"]]
        assert function["description"] == doc["description"]  # no language note in T3RL's form
        assert function.get("response") == doc.get("response")
        for name, spec in doc["parameters"]["properties"].items():
            ours = function["parameters"]["properties"][name]
            assert ours["type"] in ("string", "integer", "number", "boolean", "array", "object"), (name, ours)
            if spec.get("type") == "float":
                floats += 1
                assert ours["format"] == "float" and ours["description"].endswith("This is a float type value.")
    if entry_id == "multi_turn_base_0":
        # REFERENCE: base_0's tool block is ~25.6k characters in T3RL's form (18.9k without responses/notes).
        block = "\n".join(json.dumps(t) for t in tools)
        assert 25_400 < len(block) < 25_900, len(block)
    if "VehicleControlAPI" in entry.involved_classes or "TradingBot" in entry.involved_classes:
        assert floats > 0


def test_t3rl_style_system_prompt_and_reveal_message():
    entry = catalog.load_entry("multi_turn_miss_func_0")  # `sort` is held back until turn 3
    first = prompts.first_messages(entry, "t3rl")
    assert first[0]["role"] == "system" and first[1:] == entry.turn_messages(0)
    system = first[0]["content"]
    for requirement in ("<thinking></thinking>", "<tool_call></tool_call>", "JSON", "plain text", "complete"):
        assert requirement in system, requirement
    reveal = prompts.turn_messages(entry, 3, "t3rl")
    docs_json, sentence = reveal[0]["content"].rsplit("\n", 1)
    assert sentence == DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_FC
    assert json.loads(docs_json) == [d for d in catalog.class_tool_docs("GorillaFileSystem") if d["name"] == "sort"]
    assert [t["function"]["name"] for t in prompts.revealed_tools(entry, 3, "t3rl")] == ["sort"]
    assert prompts.turn_messages(entry, 2, "t3rl") == entry.turn_messages(2)
    assert prompts.revealed_tools(entry, 2, "t3rl") == []


@pytest.mark.parametrize("style", prompts.STYLES)
def test_episode_shows_the_style_and_scores_the_same(style):
    entry = catalog.load_entry("multi_turn_miss_func_0")
    episode = Episode(entry.id, prompt_style=style)
    assert episode.first_messages == prompts.first_messages(entry, style)
    assert episode.tools == prompts.tools(entry, style)
    openings = []
    for calls in entry.ground_truth:
        if calls:
            episode.step(list(calls))
        openings.append(episode.end_turn())
    assert openings[2] == prompts.turn_messages(entry, 3, style) and openings[-1] is None
    assert episode.progress == 1.0


def test_unknown_style_names_the_key_and_the_known_styles():
    with pytest.raises(ValueError, match=r"prompt\.style.*'plain'.*\['t3rl', 'bfcl'\]"):
        Episode("multi_turn_base_0", prompt_style="plain")
    assert config_checks.CHOICES["prompt.style"] == prompts.STYLES


def test_config_refuses_an_unknown_prompt_style():
    from t3rl_jax.config import load_config

    assert load_config("tiny").prompt.style == "t3rl"
    assert load_config("tiny", ["prompt.style=bfcl"]).prompt.style == "bfcl"
    with pytest.raises(config_checks.ConfigError, match=r"^prompt\.style: must be one of \('t3rl', 'bfcl'\)"):
        load_config("tiny", ["prompt.style=plain"])
