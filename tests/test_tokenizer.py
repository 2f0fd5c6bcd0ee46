import json
import os
import shutil

import pytest
import tokenizers

from t3rl_jax.tokenizer import (
    QWEN3_PADDED_VOCAB_SIZE,
    QWEN3_VOCAB_SIZE,
    default_tokenizer_dir,
    load_tokenizer,
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def vocab_json():
    with open(os.path.join(default_tokenizer_dir(), "vocab.json"), encoding="utf-8") as f:
        return json.load(f)


def test_real_vocab_size_and_padded_model_vocab(tok):
    assert tok.vocab_size == QWEN3_VOCAB_SIZE == 151_669
    assert tok.padded_vocab_size == QWEN3_PADDED_VOCAB_SIZE == 151_936
    assert tok.backend.get_vocab_size(with_added_tokens=False) == 151_643


def test_special_ids_match_the_shipped_tokenizer_config(tok):
    with open(os.path.join(default_tokenizer_dir(), "tokenizer_config.json"), encoding="utf-8") as f:
        added = {v["content"]: int(k) for k, v in json.load(f)["added_tokens_decoder"].items()}
    assert tok.im_start_id == added["<|im_start|>"]
    assert tok.im_end_id == added["<|im_end|>"] == 151645
    assert tok.endoftext_id == added["<|endoftext|>"] == tok.pad_id
    assert tok.tool_call_id == added["<tool_call>"] == 151657
    assert tok.tool_call_end_id == added["</tool_call>"]
    assert tok.tool_response_id == added["<tool_response>"]
    assert tok.tool_response_end_id == added["</tool_response>"]
    assert tok.stop_ids == (151645, added["<|endoftext|>"])


def test_encode_uses_bpe_vocab_and_keeps_added_tokens_whole(tok, vocab_json):
    # Byte-level BPE writes "\n" as "Ċ" and a leading space as "Ġ" in vocab.json.
    ids = tok.encode("<|im_start|>user\nhello world<tool_call>")
    assert ids == [tok.im_start_id, vocab_json["user"], vocab_json["Ċ"], vocab_json["hello"], vocab_json["Ġworld"],
                   tok.tool_call_id]
    assert tok.encode("") == []


@pytest.mark.parametrize(
    "text",
    ["plain ascii", "  leading and trailing  \n\n", "ünïcödé 日本語 🙂 emoji", '{"a": [1, 2.5e-3, null]}', "\t\r\n x"],
)
def test_decode_inverts_encode(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_decode_can_drop_special_tokens(tok):
    ids = tok.encode("<|im_start|>assistant\nhi<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\nhi"


def test_encode_batch_matches_encode(tok):
    texts = ["a b c", "<|im_end|>\n", "日本"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_bad_input_is_named(tok):
    with pytest.raises(ValueError, match="151936"):
        tok.decode([1, 151936])
    with pytest.raises(TypeError, match="str"):
        tok.encode(b"bytes")
    with pytest.raises(KeyError, match="no_such_token"):
        tok.token_id("<no_such_token>")


def test_loads_from_a_local_hf_dir(tmp_path, tok):
    shutil.copy(os.path.join(default_tokenizer_dir(), "tokenizer.json"), tmp_path / "tokenizer.json")
    local = load_tokenizer(str(tmp_path))
    assert local.vocab_size == tok.vocab_size
    assert local.encode("same ids?") == tok.encode("same ids?")


def test_missing_dir_and_non_qwen_tokenizer_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path / "nowhere"))
    other = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    other.add_special_tokens(["<|im_start|>"])
    other.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="<\\|im_end\\|>"):
        load_tokenizer(str(tmp_path))


def test_load_is_cached(tok):
    assert load_tokenizer() is tok
