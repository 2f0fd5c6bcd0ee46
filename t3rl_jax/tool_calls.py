"""Parse a sampled assistant reply into Qwen-format tool calls; never raises on model output.

    reply = parse_reply_ids(sampled_ids, tokenizer)     # or parse_tool_calls(text, finish_reason=...)
    reply.tool_calls      # tuple[ToolCall(name, arguments: dict)], the well-formed calls in order
    reply.errors          # tuple[ToolCallError(message, block)], one per problem found
    reply.feedback()      # the problems (first 5) as one message to send back to the model ('' when none)
    reply.content         # text outside the <tool_call> blocks and the reasoning blocks, stripped
    reply.reasoned        # the reply held a <think> / <thinking> block (removed before parsing)
    reply.surrounding_text  # the reply has calls and text next to them (allowed; counted in rollout metrics)
    reply.finish_reason   # "im_end" (ended properly) | "endoftext" | "truncated" (no stop token)
    reply.ended           # finish_reason == "im_end"

Rules (T3RL's Hermes-style parser and bfcl-eval's Qwen handler, see REFERENCE.md "Parsing"): reasoning blocks
(`<think>...</think>`, `<thinking>...</thinking>`) are removed first, so calls written inside them never run; a
reasoning tag without its partner is an error. Then every `<tool_call>` JSON `</tool_call>` block is a call; the
JSON must be an object with a non-empty string `name`; `arguments` defaults to `{}` and otherwise must be an object
(or a string holding one). Text around the blocks is allowed (`allow_surrounding_text=False` makes it an error).
Each bad block, an unclosed block and a stray `</tool_call>` become errors; well-formed blocks are still returned so
the caller decides whether to run them. A reply with no blocks at all is a plain answer, not an error (even when
truncated: check `ended`).

Time is linear in the reply length (str.find scans, json's C scanner) and replies longer than `max_chars` are
refused with one error. Deeply nested JSON hits Python's recursion limit inside json, which is caught.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from t3rl_jax.tokenizer import TOOL_CALL, TOOL_CALL_END, QwenTokenizer

REASONING_TAGS = (("<think>", "</think>"), ("<thinking>", "</thinking>"))

FinishReason = Literal["im_end", "endoftext", "truncated"]
FORMAT_REMINDER = (
    'Write each function call as <tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
DEFAULT_MAX_CHARS = 1_000_000
_SNIPPET_CHARS = 120


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ToolCallError:
    message: str  # phrased for the model: it is sent back as feedback
    block: int | None  # 0-based index of the offending <tool_call> block; None for problems outside blocks


@dataclass(frozen=True)
class ParsedReply:
    text: str
    content: str
    tool_calls: tuple[ToolCall, ...]
    errors: tuple[ToolCallError, ...]
    finish_reason: FinishReason
    reasoned: bool = False

    @property
    def surrounding_text(self) -> bool:
        return bool(self.tool_calls) and bool(self.content)

    @property
    def ended(self) -> bool:
        return self.finish_reason == "im_end"

    @property
    def ok(self) -> bool:
        return not self.errors

    def feedback(self, max_errors: int = 5) -> str:
        """The problems as one message for the model; long lists are cut so the feedback stays short."""
        if not self.errors:
            return ""
        lines = [e.message for e in self.errors[:max_errors]]
        if len(self.errors) > max_errors:
            lines.append(f"... and {len(self.errors) - max_errors} more problems.")
        return "\n".join(lines + [FORMAT_REMINDER])


def _snippet(text: str) -> str:
    text = text.strip()
    if len(text) > _SNIPPET_CHARS:
        text = text[: _SNIPPET_CHARS - 3] + "..."
    return json.dumps(text, ensure_ascii=False)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _loads(text: str) -> tuple[Any, str | None]:
    """json.loads that reports failure as a message instead of raising."""
    try:
        return json.loads(text, parse_constant=_reject_constant), None
    except json.JSONDecodeError as e:
        return None, f"{e.msg} at character {e.pos}"
    except RecursionError:
        return None, "nested too deeply"
    except ValueError as e:  # NaN/Infinity, integers over Python's digit limit
        return None, str(e)


def _parse_block(body: str, block: int) -> ToolCall | ToolCallError:
    where = f"Tool call {block + 1}"
    if not body.strip():
        return ToolCallError(f"{where} is empty.", block)
    value, problem = _loads(body)
    if problem is not None:
        return ToolCallError(f"{where} is not valid JSON ({problem}): {_snippet(body)}.", block)
    if not isinstance(value, dict):
        return ToolCallError(f"{where} must be a JSON object with \"name\" and \"arguments\": {_snippet(body)}.", block)
    name = value.get("name")
    if not isinstance(name, str) or not name.strip():
        return ToolCallError(f"{where} has no function name (a non-empty string \"name\"): {_snippet(body)}.", block)
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):
        arguments, problem = _loads(arguments)
        if problem is not None:
            return ToolCallError(f"{where} ({name}): \"arguments\" is a string that is not valid JSON ({problem}).", block)
    if not isinstance(arguments, dict):
        kind = type(arguments).__name__
        return ToolCallError(f"{where} ({name}): \"arguments\" must be a JSON object, got {kind}.", block)
    return ToolCall(name=name, arguments=arguments)


def strip_reasoning(text: str, *, truncated: bool = False) -> tuple[str, bool, list[ToolCallError]]:
    """(text without its reasoning blocks, whether it had any, problems with the reasoning tags)."""
    errors: list[ToolCallError] = []
    reasoned = False
    for open_tag, close_tag in REASONING_TAGS:
        opened, closed = text.count(open_tag), text.count(close_tag)
        if not opened and not closed:
            continue
        reasoned = True
        if opened != closed:
            cut = " (the reply was cut off at the length limit)" if truncated and opened > closed else ""
            errors.append(ToolCallError(f"Mismatched {open_tag} tags: {opened} opening, {closed} closing{cut}.", None))
            continue
        kept, pos = [], 0
        while True:  # str.find scans keep this linear in the reply length
            start, end = text.find(open_tag, pos), text.find(close_tag, pos)
            if start < 0 and end < 0:
                kept.append(text[pos:])
                break
            if start < 0 or end < start:
                errors.append(ToolCallError(f"Found {close_tag} before its {open_tag}.", None))
                kept.append(text[pos:])
                break
            kept.append(text[pos:start])
            pos = text.find(close_tag, start + len(open_tag)) + len(close_tag)
        text = "".join(kept)
    return text, reasoned, errors


def parse_tool_calls(
    text: str,
    *,
    finish_reason: FinishReason = "im_end",
    allow_surrounding_text: bool = True,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> ParsedReply:
    """Parses the decoded reply text (without the stop token)."""
    if not isinstance(text, str):
        raise TypeError(f"parse_tool_calls needs the decoded reply as str, got {type(text).__name__}")
    if finish_reason not in ("im_end", "endoftext", "truncated"):
        raise ValueError(f"unknown finish_reason {finish_reason!r}")
    if len(text) > max_chars:
        error = ToolCallError(f"The reply is too long to parse ({len(text)} characters, limit {max_chars}).", None)
        return ParsedReply(text, "", (), (error,), finish_reason)

    original = text
    text, reasoned, errors = strip_reasoning(text, truncated=finish_reason == "truncated")
    calls: list[ToolCall] = []
    outside: list[str] = []
    pos, block = 0, 0
    next_close = -2  # cached position of the next </tool_call> (-1: none left): keeps reopened blocks linear
    while True:
        start = text.find(TOOL_CALL, pos)
        gap = text[pos:] if start < 0 else text[pos:start]
        if TOOL_CALL_END in gap:
            errors.append(ToolCallError(f"Found {TOOL_CALL_END} without a matching {TOOL_CALL}.", None))
            gap = gap.replace(TOOL_CALL_END, "")
        outside.append(gap)
        if start < 0:
            break
        body_start = start + len(TOOL_CALL)
        if next_close != -1 and next_close < body_start:
            next_close = text.find(TOOL_CALL_END, body_start)
        end = next_close
        reopened = text.find(TOOL_CALL, body_start, end if end >= 0 else len(text))
        if reopened >= 0 or end < 0:
            cut = " (the reply was cut off at the length limit)" if finish_reason == "truncated" and end < 0 else ""
            errors.append(ToolCallError(f"Tool call {block + 1} is not closed with {TOOL_CALL_END}{cut}.", block))
            block += 1
            if reopened < 0:
                break
            pos = reopened
            continue
        result = _parse_block(text[body_start:end], block)
        (calls if isinstance(result, ToolCall) else errors).append(result)
        block += 1
        pos = end + len(TOOL_CALL_END)

    content = "".join(outside).strip()
    if block and content and not allow_surrounding_text:
        errors.append(ToolCallError(f"Write nothing outside the <tool_call> blocks; found {_snippet(content)}.", None))
    return ParsedReply(original, content, tuple(calls), tuple(errors), finish_reason, reasoned)


def parse_reply_ids(
    ids: Sequence[int],
    tokenizer: QwenTokenizer,
    *,
    allow_surrounding_text: bool = True,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> ParsedReply:
    """Parses sampled ids: the reply ends at the first `<|im_end|>` / `<|endoftext|>`; none means truncated."""
    ids = [int(i) for i in ids]
    # A sampler that forgets to mask the padded vocab rows can emit ids the tokenizer cannot decode.
    unknown = sorted({i for i in ids if not 0 <= i < tokenizer.vocab_size})
    if unknown:
        ids = [i for i in ids if 0 <= i < tokenizer.vocab_size]
    stop_at = next((k for k, i in enumerate(ids) if i in tokenizer.stop_ids), None)
    if stop_at is None:
        finish_reason: FinishReason = "truncated"
        body = ids
    else:
        finish_reason = "im_end" if ids[stop_at] == tokenizer.im_end_id else "endoftext"
        body = ids[:stop_at]
    if len(body) > max_chars:  # bounds decode time, which is linear in the number of ids
        error = ToolCallError(f"The reply is too long to parse ({len(body)} tokens, limit {max_chars}).", None)
        return ParsedReply("", "", (), (error,), finish_reason)
    reply = parse_tool_calls(
        tokenizer.decode(body),
        finish_reason=finish_reason,
        allow_surrounding_text=allow_surrounding_text,
        max_chars=max_chars,
    )
    extra = []
    if unknown:
        extra.append(ToolCallError(f"The reply contained token ids outside the vocabulary: {unknown[:8]}.", None))
    if stop_at is not None and stop_at + 1 < len(ids):
        extra.append(ToolCallError("The reply continued after its end-of-message token.", None))
    if extra:
        reply = ParsedReply(reply.text, reply.content, reply.tool_calls, reply.errors + tuple(extra), finish_reason,
                            reply.reasoned)
    return reply
