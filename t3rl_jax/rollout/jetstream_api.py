"""Everything only JetStream needs (google-jetstream 0.2.2, upstream archived): its import fixes, the Qwen3
tokenizer wrapper it asks an `Engine` for, and `ResultTokens` packing. The one module that imports JetStream; the
rollout driver and scheduler never touch it (they use the slot-level `rollout.backend.RolloutBackend`).

Import fixes, applied before JetStream is imported:
- `jetstream.engine.token_utils` imports `seqio` only for SentencePiece vocabularies, and seqio drags in TensorFlow
  (~1.9 GB installed, ~3 s and ~660 MiB at import, and TF probes the GPU). We never use SentencePiece (Qwen3 is a
  BPE tokenizer served by `tokenizers`), so a stand-in `seqio` is registered first; using it raises a clear error
  instead of silently loading TensorFlow.
- JetStream's orchestrator calls `jax.tree_map`, removed from JAX; a thread exception there SIGKILLs the process.
  We alias it to `jax.tree.map` before the orchestrator is imported.
- Importing the orchestrator sets the root logger to DEBUG; we restore the previous level.
"""

from __future__ import annotations

import logging
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np


class _SentencePieceUnavailable:
    def __init__(self, *args, **kwargs):
        raise RuntimeError(
            "SentencePiece vocabularies need seqio/TensorFlow, which t3rl-jax keeps out of the process; "
            "use t3rl_jax.tokenizer (Qwen3 BPE) instead")


def _install_seqio_stand_in() -> None:
    if "seqio" in sys.modules:
        return
    seqio = types.ModuleType("seqio")
    vocabularies = types.ModuleType("seqio.vocabularies")
    vocabularies.Vocabulary = _SentencePieceUnavailable
    vocabularies.SentencePieceVocabulary = _SentencePieceUnavailable
    seqio.vocabularies = vocabularies
    seqio.__t3rl_stand_in__ = True
    sys.modules["seqio"] = seqio
    sys.modules["seqio.vocabularies"] = vocabularies


def _restore_removed_jax_apis() -> None:
    if not hasattr(jax, "tree_map"):
        jax.tree_map = jax.tree.map


_install_seqio_stand_in()
_restore_removed_jax_apis()

from jetstream.engine import engine_api, tokenizer_api  # noqa: E402


def import_orchestrator():
    """Import JetStream's orchestrator and server lazily (they pull in grpc and prometheus)."""
    root = logging.getLogger()
    level = root.level
    from jetstream.core import orchestrator, server_lib, config_lib  # noqa: F401
    root.setLevel(level)
    return orchestrator, server_lib, config_lib


def pack_result_tokens(tokens, valid, lengths, *extra) -> engine_api.ResultTokens:
    """One decode step's per-slot [B] columns as JetStream's `ResultTokens` (tokens, valid, length, then `extra`
    int32 columns, which survive `convert_to_numpy` and are ignored by the orchestrator)."""
    columns = [tokens, valid, lengths, *extra]
    data = jnp.stack([jnp.asarray(c).astype(jnp.int32) for c in columns], axis=1)
    return engine_api.ResultTokens(data=data, tokens_idx=(0, 1), valid_idx=(1, 2), length_idx=(2, 3),
                                   samples_per_slot=1)


def logprob_column(logprobs):
    """Float32 log-probs [B] bit-cast into an int32 `ResultTokens` column (`unpack_logprobs` reverses it)."""
    return jax.lax.bitcast_convert_type(jnp.asarray(logprobs, jnp.float32), jnp.int32)


def unpack_logprobs(column) -> np.ndarray:
    return np.asarray(column, np.int32).view(np.float32)


class QwenJetStreamTokenizer(tokenizer_api.Tokenizer):
    """JetStream tokenizer over the Qwen3 BPE; `<|im_end|>` and `<|endoftext|>` both stop."""

    def __init__(self, tokenizer):
        self._tok = tokenizer

    def encode(self, s: str, **kwargs):
        ids = np.asarray(self._tok.encode(s), np.int32)
        return ids, len(ids)

    def decode(self, token_ids, **kwargs) -> str:
        return self._tok.decode(token_ids)

    @property
    def pad_id(self) -> int:
        return self._tok.pad_id

    @property
    def eos_id(self) -> int:
        return self._tok.im_end_id

    @property
    def bos_id(self) -> int:
        # Qwen3 has no BOS; JetStream prepends this id to token requests, so callers strip it (see serve.py).
        return self._tok.im_start_id

    @property
    def stop_tokens(self) -> set[int]:
        return set(self._tok.stop_ids)


__all__ = ["engine_api", "tokenizer_api", "import_orchestrator", "pack_result_tokens", "logprob_column",
           "unpack_logprobs", "QwenJetStreamTokenizer"]
