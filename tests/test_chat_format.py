import importlib.util
import json
import os
import random

import pytest

from t3rl_jax.chat_format import (
    GENERATION_PROMPT,
    ChatEncoder,
    render_assistant_body,
    render_conversation,
    render_delta,
)
from t3rl_jax.tokenizer import default_tokenizer_dir, load_tokenizer

# Edge cases for the tokenizer: whitespace at both ends, unicode, digits, JSON, literal control tokens.
TEXTS = [
    "hello",
    "",
    " leading space",
    "trailing newline\n",
    "\nleading newline",
    "\n\n",
    "multi\n\nline  \n",
    "ünïcödé 日本語 🙂",
    '{"result": {"files": ["a.txt", "b.txt"], "count": 2}}',
    "tab\tseparated\t",
    "1234567890",
    "Error: No such file or directory: 'x'",
    "text with a literal <|im_end|> inside",
    "   ",
    "  \nindented newline",
]


def leading_whitespace_has_newline(text):
    return any(c in "\r\n" for c in text[: len(text) - len(text.lstrip())])


# Replies whose body would start with whitespace holding a newline are left out ("   " counts: a tool call
# after it adds "\n"): see the seam note in chat_format's docstring.
ASSISTANT_TEXTS = [t for t in TEXTS if not leading_whitespace_has_newline(t) and (t.strip() or not t)]
ARGUMENTS = [{}, {"file_name": "notes.txt"}, {"a": 1, "b": [1.5, None, True]}, {"q": "日本 🙂", "nested": {"k": "v"}}]
HAND_TOOLS = [
    {"type": "function", "function": {"name": "ls", "description": "List files.", "parameters": {"type": "object",
     "properties": {"a": {"type": "boolean", "description": "Show hidden files."}}, "required": []}}},
    {"type": "function", "function": {"name": "translate", "description": "Übersetzt Text → 日本語.",
     "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}},
]


def _bfcl_tools():
    spec = importlib.util.find_spec("bfcl_eval")  # locates without importing (the import writes files)
    if spec is None:
        return []
    folder = os.path.join(list(spec.submodule_search_locations)[0], "data", "multi_turn_func_doc")
    tools = []
    for name in ("gorilla_file_system.json", "travel_booking.json"):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            tools += [{"type": "function", "function": json.loads(line)} for line in f if line.strip()]
    return tools


BFCL_TOOLS = _bfcl_tools()


def _tool_call(rng):
    arguments = rng.choice(ARGUMENTS)
    if rng.random() < 0.3:
        arguments = json.dumps(arguments)  # the template writes string arguments verbatim
    call = {"name": rng.choice(["ls", "cd", "translate", "get_flight_cost"]), "arguments": arguments}
    return {"type": "function", "function": call} if rng.random() < 0.7 else call


def random_conversation(rng):
    """A rollout-shaped conversation ending in a non-assistant message (what every prompt looks like)."""
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": rng.choice(TEXTS)})
    tools = rng.choice([None, HAND_TOOLS, BFCL_TOOLS or HAND_TOOLS])
    turns = rng.randint(1, 3)
    for turn in range(turns):
        messages.append({"role": "user", "content": rng.choice(TEXTS)})
        for _ in range(rng.randint(0, 3)):
            calls = [_tool_call(rng) for _ in range(rng.randint(1, 3))]
            messages.append({"role": "assistant", "content": rng.choice(ASSISTANT_TEXTS), "tool_calls": calls})
            messages += [{"role": "tool", "content": rng.choice(TEXTS)} for _ in calls]
        if turn < turns - 1:
            messages.append({"role": "assistant", "content": rng.choice(ASSISTANT_TEXTS)})
    return messages, tools


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def chat(tok):
    return ChatEncoder(tok)


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(default_tokenizer_dir())


def _hf_text(hf, messages, tools, **kwargs):
    return hf.apply_chat_template(messages, tools=tools, tokenize=False, **kwargs)


def test_system_tools_user_generation_prompt_matches_transformers(hf, chat):
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Move 'a.txt' into the folder 'docs'."}]
    tools = BFCL_TOOLS or HAND_TOOLS
    ours = render_conversation(messages, tools, add_generation_prompt=True)
    assert ours == _hf_text(hf, messages, tools, add_generation_prompt=True)
    assert chat.prompt_ids(messages, tools) == hf.apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False)
    # One tool per line, exactly as json.dumps writes it, between the <tools> tags.
    lines = ours.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0].split("\n")
    assert [json.loads(line) for line in lines] == tools
    assert ours.endswith("</tool_call><|im_end|>\n<|im_start|>user\nMove 'a.txt' into the folder 'docs'.<|im_end|>\n"
                         + GENERATION_PROMPT)


def test_tool_responses_and_multi_turn_match_transformers(hf):
    messages = [
        {"role": "user", "content": "list then translate"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "ls", "arguments": {"a": True}}},
            {"type": "function", "function": {"name": "translate", "arguments": '{"text": "hi"}'}}]},
        {"role": "tool", "content": '{"current_directory_content": ["a.txt"]}'},
        {"role": "tool", "content": "こんにちは"},
        {"role": "assistant", "content": "Done: a.txt, こんにちは"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "Calling ls.", "tool_calls": [{"name": "ls", "arguments": {}}]},
        {"role": "tool", "content": "[]"},
    ]
    ours = render_conversation(messages, HAND_TOOLS, add_generation_prompt=True)
    assert ours == _hf_text(hf, messages, HAND_TOOLS, add_generation_prompt=True)
    assert "<|im_start|>user\n<tool_response>\n{\"current_directory_content\": [\"a.txt\"]}\n</tool_response>\n" \
           "<tool_response>\nこんにちは\n</tool_response><|im_end|>\n" in ours
    assert 'Calling ls.\n<tool_call>\n{"name": "ls", "arguments": {}}\n</tool_call><|im_end|>' in ours


def test_random_rollout_prompts_match_transformers(hf):
    rng = random.Random(0)
    for _ in range(60):
        messages, tools = random_conversation(rng)
        assert render_conversation(messages, tools, add_generation_prompt=True) == _hf_text(
            hf, messages, tools, add_generation_prompt=True)


def test_documented_differences_from_the_thinking_template(hf):
    # 1. A final assistant message after the last query: the thinking template adds an empty think block.
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    theirs = _hf_text(hf, messages, None)
    assert "<think>\n\n</think>\n\n" in theirs
    assert render_conversation(messages) == theirs.replace("<think>\n\n</think>\n\n", "")
    # 2. Earlier assistant content is kept verbatim; the thinking template strips everything up to </think>.
    messages = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>x</think>a1"},
                {"role": "user", "content": "q2"}]
    assert "<|im_start|>assistant\na1<|im_end|>" in _hf_text(hf, messages, None)
    assert "<|im_start|>assistant\n<think>x</think>a1<|im_end|>" in render_conversation(messages)
    # 3. No thinking switch: the generation prompt is always bare.
    assert _hf_text(hf, messages, None, add_generation_prompt=True, enable_thinking=False).endswith(
        GENERATION_PROMPT + "<think>\n\n</think>\n\n")
    assert render_conversation(messages, add_generation_prompt=True).endswith("q2<|im_end|>\n" + GENERATION_PROMPT)


def _rollout_ids(chat, messages, tools):
    """Builds ids the way the rollout does: prompt, then sampled replies and deltas, never re-tokenising."""
    starts = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    ids = chat.prompt_ids(messages[: starts[0]] if starts else messages, tools)
    for k, a in enumerate(starts):
        ids += chat.assistant_ids(messages[a])
        ids += chat.delta_ids(messages[a + 1: starts[k + 1] if k + 1 < len(starts) else len(messages)])
    return ids


def test_prompt_plus_replies_plus_deltas_equal_the_full_rendering(chat, tok):
    rng = random.Random(1)
    checked = 0
    for _ in range(200):
        messages, tools = random_conversation(rng)
        full = tok.encode(render_conversation(messages, tools, add_generation_prompt=True))
        assert _rollout_ids(chat, messages, tools) == full
        checked += any(m["role"] == "assistant" for m in messages)
    assert checked > 100  # most conversations exercise at least one delta


def test_no_merge_across_the_boundary_after_im_end(tok):
    # Whatever ends one message and starts the next, the `\n` after <|im_end|> stays its own token.
    for left in TEXTS:
        for right in TEXTS:
            before = f"<|im_start|>user\n{left}<|im_end|>"
            after = f"\n<|im_start|>user\n<tool_response>\n{right}\n</tool_response><|im_end|>\n" + GENERATION_PROMPT
            assert tok.encode(before + after) == tok.encode(before) + tok.encode(after)


def test_the_reply_seam_merges_only_for_leading_whitespace_with_a_newline(tok):
    # The documented exception: "assistant\n" + a reply starting with whitespace that holds a newline
    # re-tokenises differently (the newlines join into one token).
    prompt = "<|im_start|>user\nq<|im_end|>\n" + GENERATION_PROMPT
    for reply in TEXTS + ["   \n<tool_call>"]:
        joined = tok.encode(prompt + reply) == tok.encode(prompt) + tok.encode(reply)
        assert joined == (not leading_whitespace_has_newline(reply)), reply


def test_delta_layout(chat, tok):
    ids = chat.delta_ids([{"role": "tool", "content": "ok"}])
    assert ids[0] == tok.encode("\n")[0]
    assert ids[-3:] == tok.encode(GENERATION_PROMPT)
    assert tok.decode(ids) == "\n<|im_start|>user\n<tool_response>\nok\n</tool_response><|im_end|>\n" + GENERATION_PROMPT
    assert tok.decode(chat.delta_ids([{"role": "user", "content": "x"}], add_generation_prompt=False)) == (
        "\n<|im_start|>user\nx<|im_end|>\n")
    # A reply cut at the length limit is closed by the delta itself.
    closed = chat.delta_ids([{"role": "user", "content": "Your reply was too long."}], close_assistant=True)
    assert closed[:2] == [tok.im_end_id, tok.encode("\n")[0]]


def test_truncated_reply_then_closing_delta_equals_full_rendering(chat, tok):
    messages = [{"role": "user", "content": "go"}]
    cut = "I will call <tool_call>\n{\"name\": \"ls\", \"argu"
    feedback = {"role": "user", "content": "Your reply was cut off."}
    ids = chat.prompt_ids(messages) + tok.encode(cut) + chat.delta_ids([feedback], close_assistant=True)
    full = messages + [{"role": "assistant", "content": cut}, feedback]
    assert ids == tok.encode(render_conversation(full, add_generation_prompt=True))


def test_assistant_ids_end_with_im_end_and_render_tool_calls(chat, tok):
    message = {"role": "assistant", "content": None,
               "tool_calls": [{"function": {"name": "cd", "arguments": {"folder": "docs"}}},
                              {"name": "ls", "arguments": "{}"}]}
    body = render_assistant_body(message)
    assert body == ('<tool_call>\n{"name": "cd", "arguments": {"folder": "docs"}}\n</tool_call>\n'
                    '<tool_call>\n{"name": "ls", "arguments": {}}\n</tool_call>')
    ids = chat.assistant_ids(message)
    assert ids[-1] == tok.im_end_id and ids[0] == tok.tool_call_id


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "robot", "content": "x"}], "message 0: unknown role 'robot'"),
        ([{"role": "user", "content": None}], "message 0 \\(user\\): content must be a str"),
        ([{"role": "user", "content": "a"}, {"role": "tool", "content": 3}], "message 1 \\(tool\\)"),
        ([{"role": "user", "content": "a", "tool_calls": [{"name": "f", "arguments": {}}]}], "only assistant"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"arguments": {}}]}], "message 0 tool call 0: 'name'"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]}], "missing 'arguments'"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": {1j}}]}], "serialisable"),
        ([{"role": "assistant", "content": "", "tool_calls": {"name": "f"}}], "tool_calls must be a list"),
        (["user: hi"], "message 0 must be a dict"),
        ("hi", "messages must be a list"),
    ],
)
def test_bad_messages_are_named(messages, match):
    with pytest.raises(ValueError, match=match):
        render_conversation(messages)


def test_bad_tools_and_empty_delta_are_refused():
    with pytest.raises(ValueError, match="tool 1 is not JSON-serialisable"):
        render_conversation([{"role": "user", "content": "x"}], [{"name": "ok"}, {"name": object()}])
    with pytest.raises(ValueError, match="tools must be a list"):
        render_conversation([{"role": "user", "content": "x"}], {"name": "f"})
    with pytest.raises(ValueError, match="needs new messages"):
        render_delta([], add_generation_prompt=False)
