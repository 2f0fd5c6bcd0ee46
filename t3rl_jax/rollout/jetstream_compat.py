"""The one place that imports JetStream (google-jetstream 0.2.2, upstream archived).

Why this module exists:
- `jetstream.engine.token_utils` imports `seqio` only for SentencePiece vocabularies, and seqio drags in TensorFlow
  (~1.9 GB installed, ~3 s and ~660 MiB at import, and TF probes the GPU). We never use SentencePiece (Qwen3 is a
  BPE tokenizer served by `tokenizers`), so a stand-in `seqio` is registered before JetStream is imported; using it
  raises a clear error instead of silently loading TensorFlow.
- JetStream's orchestrator calls `jax.tree_map`, removed from JAX; a thread exception there SIGKILLs the process.
  We alias it to `jax.tree.map` before the orchestrator is imported.
- Importing the orchestrator sets the root logger to DEBUG; we restore the previous level.
"""

from __future__ import annotations

import logging
import sys
import types

import jax


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


__all__ = ["engine_api", "tokenizer_api", "import_orchestrator"]
