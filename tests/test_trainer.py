"""The GRPO run end to end on real BFCL episodes: stage-2 dry run, bad input, an environment that fails every
episode. (Exact resume and the plateau stop's export of the best params: tests/test_resume.py.)"""

import os
import subprocess
import sys

import pytest

from t3rl_jax.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


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
def test_a_step_whose_every_episode_failed_in_the_environment_stops_before_any_update(tmp_path, monkeypatch):
    """Workers that cannot answer in time (each request takes 0.5 s, the step timeout is 0.05 s): every episode
    fails, so the run must stop at once naming the pool settings and the workers' reason, with no update and no
    checkpoint written."""
    from environments.bfcl.worker import DELAY_ENV
    from test_resume import run_tiny

    monkeypatch.setenv(DELAY_ENV, "0.5")  # read by the run's env workers (run_tiny copies os.environ)
    run = run_tiny(tmp_path / "run", tmp_path / "splits", extra=["env.step_timeout_s=0.05"])
    assert run.returncode != 0
    assert "EnvironmentBroken: step 0: all 2 episodes failed in the environment pool (env.num_workers=2" in run.stderr
    assert "exceeded 0.05s; worker killed" in run.stderr
    assert "first reason:" in run.stderr
    assert not [p for p in os.listdir(tmp_path / "run" / "checkpoints") if p.isdigit()]
