import json
import random
import re
import time

import pytest

from t3rl_jax.chat_format import render_assistant_body
from t3rl_jax.tokenizer import load_tokenizer
from t3rl_jax.tool_calls import FORMAT_REMINDER, ToolCall, parse_reply_ids, parse_tool_calls


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def block(payload: str) -> str:
    return f"<tool_call>\n{payload}\n</tool_call>"


def test_plain_answer_has_no_calls_and_no_errors():
    reply = parse_tool_calls("The file contains 3 lines.")
    assert reply.tool_calls == () and reply.ok and reply.ended
    assert reply.content == "The file contains 3 lines." and reply.feedback() == ""


def test_one_and_several_calls_with_dict_or_string_arguments():
    text = "\n".join([
        block('{"name": "cd", "arguments": {"folder": "docs"}}'),
        block('{"name": "mv", "arguments": "{\\"source\\": \\"a.txt\\", \\"destination\\": \\"b\\"}"}'),
        block('{"name": "pwd", "arguments": {}}'),
    ])
    reply = parse_tool_calls(text)
    assert reply.ok, reply.feedback()
    assert reply.tool_calls == (
        ToolCall("cd", {"folder": "docs"}),
        ToolCall("mv", {"source": "a.txt", "destination": "b"}),
        ToolCall("pwd", {}),
    )
    assert reply.content == ""


def test_rendered_assistant_messages_parse_back_to_their_calls():
    rng = random.Random(0)
    values = [1, -2.5, "日本 🙂", None, True, [1, {"x": "y"}], {"nested": {"deep": [1, 2]}}, 'quote " and \\']
    for _ in range(200):
        calls = [
            {"name": rng.choice(["ls", "cd", "book_flight"]),
             "arguments": {f"k{i}": rng.choice(values) for i in range(rng.randint(0, 4))}}
            for _ in range(rng.randint(1, 4))
        ]
        wire = [{"function": dict(c, arguments=json.dumps(c["arguments"]))} if rng.random() < 0.3 else c
                for c in calls]
        reply = parse_tool_calls(render_assistant_body({"role": "assistant", "content": None, "tool_calls": wire}))
        assert reply.ok, reply.feedback()
        assert reply.tool_calls == tuple(ToolCall(c["name"], c["arguments"]) for c in calls)


@pytest.mark.parametrize(
    "text, message",
    [
        (block('{"name": "ls", "arguments": {"a": tru}}'), "Tool call 1 is not valid JSON"),
        (block('{"arguments": {}}'), "Tool call 1 has no function name"),
        (block('{"name": "", "arguments": {}}'), "no function name"),
        (block('{"name": 7, "arguments": {}}'), "no function name"),
        (block('{"name": "ls", "arguments": [1, 2]}'), '"arguments" must be a JSON object, got list'),
        (block('{"name": "ls", "arguments": 3}'), "got int"),
        (block('{"name": "ls", "arguments": "not json"}'), '"arguments" is a string that is not valid JSON'),
        (block('{"name": "ls", "arguments": "[1]"}'), "got list"),
        (block('["ls", {}]'), "must be a JSON object"),
        (block(""), "Tool call 1 is empty"),
        (block('{"name": "ls", "arguments": {"x": NaN}}'), "NaN is not valid JSON"),
        ('<tool_call>\n{"name": "ls", "arguments": {}}', "Tool call 1 is not closed"),
        ('done</tool_call>', "without a matching <tool_call>"),
        ("<thinking>plan" + block('{"name": "ls", "arguments": {}}'), "Mismatched <thinking> tags: 1 opening, 0"),
        ("</think>" + block('{"name": "ls", "arguments": {}}') + "<think>", "Found </think> before its <think>"),
    ],
)
def test_malformed_replies_become_error_values(text, message):
    reply = parse_tool_calls(text)
    assert not reply.ok
    assert any(re.search(message, e.message) for e in reply.errors), reply.errors
    assert reply.feedback().endswith(FORMAT_REMINDER)


def test_good_blocks_survive_next_to_bad_ones():
    text = "\n".join([block('{"name": "ls", "arguments": {}}'), block("{oops"), block('{"name": "pwd", "arguments": {}}')])
    reply = parse_tool_calls(text)
    assert [c.name for c in reply.tool_calls] == ["ls", "pwd"]
    assert [e.block for e in reply.errors] == [1]
    assert reply.errors[0].message.startswith("Tool call 2 is not valid JSON")


def test_block_reopened_before_closing_is_unclosed_and_the_next_one_still_parses():
    reply = parse_tool_calls('<tool_call>\n{"name": "ls"\n' + block('{"name": "cd", "arguments": {"folder": "x"}}'))
    assert reply.tool_calls == (ToolCall("cd", {"folder": "x"}),)
    assert [(e.block, "not closed" in e.message) for e in reply.errors] == [(0, True)]


def test_text_around_the_blocks_is_allowed_and_flagged():
    # T3RL's parser and bfcl-eval's Qwen handler run the calls of such a reply (REFERENCE.md "Parsing").
    text = "I'll list the files.\n" + block('{"name": "ls", "arguments": {}}') + "\nThen I will report."
    reply = parse_tool_calls(text)
    assert reply.ok, reply.feedback()
    assert reply.tool_calls == (ToolCall("ls", {}),) and reply.surrounding_text
    assert reply.content == "I'll list the files.\n\nThen I will report."
    assert not parse_tool_calls(block('{"name": "ls", "arguments": {}}')).surrounding_text
    assert not parse_tool_calls("Just an answer.").surrounding_text


def test_surrounding_text_can_be_refused():
    for text in ("Let me check.\n" + block('{"name": "ls", "arguments": {}}'),
                 block('{"name": "ls", "arguments": {}}') + " trailing"):
        reply = parse_tool_calls(text, allow_surrounding_text=False)
        assert not reply.ok and "Write nothing outside the <tool_call> blocks" in reply.feedback()


def test_missing_arguments_default_to_an_empty_object():
    reply = parse_tool_calls(block('{"name": "pwd"}'))
    assert reply.ok and reply.tool_calls == (ToolCall("pwd", {}),)


@pytest.mark.parametrize("open_tag, close_tag", [("<think>", "</think>"), ("<thinking>", "</thinking>")])
def test_reasoning_blocks_are_stripped_before_parsing(open_tag, close_tag):
    inside = block('{"name": "rm", "arguments": {"file_name": "a.txt"}}')  # a call written while reasoning
    text = f"{open_tag}\nI should list first.\n{inside}\n{close_tag}\n\n" + block('{"name": "ls", "arguments": {}}')
    reply = parse_tool_calls(text)
    assert reply.ok, reply.feedback()
    assert reply.tool_calls == (ToolCall("ls", {}),) and reply.reasoned
    assert reply.content == "" and not reply.surrounding_text and reply.text == text
    answer = parse_tool_calls(f"{open_tag}done{close_tag}The file has 3 lines.")
    assert answer.ok and answer.tool_calls == () and answer.content == "The file has 3 lines." and answer.reasoned


def test_cut_off_reasoning_is_reported_as_cut_off():
    reply = parse_tool_calls("<thinking>I will first", finish_reason="truncated")
    assert not reply.ok and "cut off at the length limit" in reply.feedback()


def test_reply_ids_report_how_the_message_ended(tok):
    body = tok.encode(block('{"name": "ls", "arguments": {}}'))
    ended = parse_reply_ids(body + [tok.im_end_id], tok)
    assert ended.ended and ended.finish_reason == "im_end" and ended.ok and ended.tool_calls == (ToolCall("ls", {}),)
    eos = parse_reply_ids(body + [tok.endoftext_id], tok)
    assert eos.finish_reason == "endoftext" and not eos.ended and eos.ok

    cut = parse_reply_ids(body[:-3], tok)
    assert cut.finish_reason == "truncated" and not cut.ended
    assert "cut off at the length limit" in cut.feedback()


def test_reply_ids_flag_tokens_after_the_stop_and_out_of_vocab_ids(tok):
    body = tok.encode("answer")
    after = parse_reply_ids(body + [tok.im_end_id] + tok.encode("more"), tok)
    assert after.text == "answer" and "continued after its end-of-message token" in after.feedback()
    padded = parse_reply_ids(body + [tok.vocab_size + 5, tok.im_end_id], tok)
    assert padded.text == "answer" and str(tok.vocab_size + 5) in padded.feedback()


def test_deep_nesting_is_an_error_not_a_crash():
    deep = "[" * 200_000 + "]" * 200_000
    reply = parse_tool_calls(block(deep))
    assert not reply.ok and "not valid JSON (nested too deeply)" in reply.errors[0].message
    in_string = json.dumps({"name": "ls", "arguments": "{" + '"a":{' * 100_000 + "}" * 100_001})
    reply = parse_tool_calls(block(in_string))
    assert not reply.ok and '"arguments" is a string that is not valid JSON (nested too deeply)' in reply.feedback()


def test_huge_inputs_are_bounded_in_time():
    many = "\n".join(block('{"name": "ls", "arguments": {"i": %d}}' % i) for i in range(10_000))
    junk = "<tool_call>" + "x" * 500_000  # unclosed block over a long tail
    opens = "<tool_call>" * 50_000  # every block reopened
    start = time.perf_counter()
    assert len(parse_tool_calls(many).tool_calls) == 10_000
    assert not parse_tool_calls(junk).ok
    reopened = parse_tool_calls(opens)
    assert len(reopened.errors) == 50_000
    assert reopened.feedback().count("\n") < 10 and "and 49995 more problems" in reopened.feedback()
    assert len(parse_tool_calls("</tool_call>" * 50_000).errors) == 1
    too_long = parse_tool_calls("x" * 2_000_001, max_chars=2_000_000)
    assert too_long.errors[0].message.startswith("The reply is too long to parse")
    assert time.perf_counter() - start < 5.0


def test_wrong_argument_types_raise_clearly():
    with pytest.raises(TypeError, match="str"):
        parse_tool_calls(b"<tool_call>")
    with pytest.raises(ValueError, match="finish_reason 'eos'"):
        parse_tool_calls("x", finish_reason="eos")
