"""The GRPO loop end to end on real BFCL episodes: exact resume after SIGKILL, stage-2 dry run, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from t3rl_jax.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Deterministic metrics only: timings and throughput differ between runs.
VOLATILE = ("time/", "rollout/", "throughput/", "mfu")


def _overrides(workdir, splits, steps):
    return [f"workdir={workdir}", f"data.splits_dir={splits}", f"train.num_steps={steps}",
            "data.prompts_per_step=1", "rollout.samples_per_prompt=2", "rollout.max_concurrent_decodes=2",
            "rollout.max_prefill_length=2304", "rollout.max_response_tokens=24", "rollout.max_context_tokens=2336",
            "train.max_seq_len=2336", "train.micro_batch_size=1", "checkpoint.every_steps=1",
            "checkpoint.async_save=False", "eval.every_steps=0", "env.num_workers=0", "log.wandb_mode=disabled"]


def _cmd(overrides):
    return [sys.executable, "-m", "t3rl_jax.main", "--config=tiny"] + [f"--config.{o}" for o in overrides]


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["WANDB_MODE"] = "offline"  # exercise the wandb resume path after a hard kill
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows}


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    splits = tmp_path / "splits"
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run = subprocess.run(_cmd(_overrides(straight, splits, 3)), env=_env(), cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert os.path.isdir(straight / "hf_export") and (straight / "hf_export" / "config.json").exists()

    proc = subprocess.Popen(_cmd(_overrides(killed, splits, 3)), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 900
    ckpt = killed / "checkpoints"
    while time.time() < deadline and not (ckpt.exists() and any(p.name == "2" for p in ckpt.iterdir())):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(_cmd(_overrides(killed, splits, 3)), env=_env(), cwd=ROOT, capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _metrics(straight), _metrics(killed)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in (1, 2, 3):
        assert a[step].keys() == b[step].keys()
        for key, value in a[step].items():
            assert b[step][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key)


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
