import subprocess
import sys


def test_importing_jetstream_keeps_tensorflow_out():
    code = ("import sys; import t3rl_jax.rollout.jetstream_api as c; c.import_orchestrator(); "
            "import jax; assert hasattr(jax, 'tree_map'); "
            "assert hasattr(c.engine_api.Engine, 'prefill'); "
            "print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_sentencepiece_stand_in_fails_loudly():
    import pytest
    from t3rl_jax.rollout import jetstream_api  # noqa: F401
    import seqio
    with pytest.raises(RuntimeError, match="SentencePiece"):
        seqio.vocabularies.SentencePieceVocabulary("x.model")
