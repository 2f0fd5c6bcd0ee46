"""The GRPO run end to end on real BFCL episodes: the plateau stop exports the best params, stage-2 dry run, bad
input. (Exact resume: tests/test_resume.py.)"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from t3rl_jax.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r for r in rows}


@pytest.mark.slow
def test_plateau_stop_exports_the_best_params_not_the_last(tmp_path):
    """Validation every step with patience 1: a random model scores the same twice, so the stage stops at step 2
    and the export must hold step 1's params (the best), not step 2's."""
    from t3rl_jax.checkpointing import Checkpointer

    from test_resume import run_tiny

    workdir = tmp_path / "run"
    run = run_tiny(workdir, tmp_path / "splits", extra=["eval.every_steps=1", "eval.plateau_patience=1",
                                                        "checkpoint.async_save=False", "train.num_steps=3"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "(plateau)" in run.stdout
    rows = _metrics(workdir)
    assert sorted(rows) == [1, 2] and rows[2]["val/accuracy/overall"] <= rows[1]["val/accuracy/overall"]
    exported = _hf_tensors(workdir / "hf_export")
    with Checkpointer(workdir / "checkpoints", keep=3, async_save=False, read_only=True) as ckpt:
        assert ckpt.all_steps() == [1, 2]
        first, last = (_embedding(ckpt, step) for step in (1, 2))
    assert not np.array_equal(first, last)
    np.testing.assert_array_equal(exported["model.embed_tokens.weight"], first)


def _embedding(ckpt, step):
    meta = ckpt._manager.item_metadata(step)["params"]
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    import jax

    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
    return np.asarray(ckpt.restore(step, abstract_params=abstract)[1]["embed"])


def _hf_tensors(hf_dir):
    from safetensors.numpy import load_file

    out = {}
    for name in os.listdir(hf_dir):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(hf_dir, name)))
    return out


def test_stage2_dry_run_builds_real_shapes_without_weights():
    env = _env()
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    out = subprocess.run([sys.executable, "-m", "t3rl_jax.main", "--config=stage2", "--config.dry_run=True"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "4,022,468,096 parameters" in out.stdout
    assert "'sequence': 4" in out.stdout


def test_bad_config_keys_name_themselves():
    with pytest.raises(ConfigError, match="train.lrr"):
        load_config("tiny", ["train.lrr=1e-6"])
    out = subprocess.run([sys.executable, "-m", "t3rl_jax.main", "--config=tiny", "--config.train.lr=fast"],
                         env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "train.lr" in out.stderr


def test_missing_split_file_is_a_clear_error(tmp_path):
    from t3rl_jax import data

    with pytest.raises(FileNotFoundError, match="environments.bfcl.splits"):
        data.load_split(tmp_path / "nope.jsonl")


def test_mesh_that_does_not_fit_the_devices_is_a_config_error_not_a_traceback():
    out = subprocess.run([sys.executable, "-m", "t3rl_jax.main", "--config=tiny", "--config.mesh.fsdp=3"],
                         env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "config error: mesh.data/fsdp/tensor/sequence" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_a_step_whose_every_episode_failed_in_the_environment_stops_before_any_update(tmp_path):
    """Workers that cannot answer in time (a 1 ms step timeout): every episode fails, so the run must stop at once
    naming the pool settings and the workers' reason, with no update and no checkpoint written."""
    from test_resume import run_tiny

    run = run_tiny(tmp_path / "run", tmp_path / "splits", extra=["env.step_timeout_s=0.001"])
    assert run.returncode != 0
    assert "EnvironmentBroken: step 0: all 2 episodes failed in the environment pool (env.num_workers=2" in run.stderr
    assert "first reason:" in run.stderr
    assert not [p for p in os.listdir(tmp_path / "run" / "checkpoints") if p.isdigit()]
