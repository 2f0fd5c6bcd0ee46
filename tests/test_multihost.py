"""Real multi-host: two processes joined through `jax.distributed` on 127.0.0.1 (gloo CPU collectives), one CPU
device and one environment pool each, run the tiny preset (warm start, KL on, validation on) and must log the same
per-step metrics as one process with two devices: each host rolls out its own groups, all hosts agree on every
decision from the gathered episodes, and the train step sees global arrays."""

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2
# Short replies and few model calls keep every row's sampled tokens <= 64, so both steps share one compiled update.
# Two samples per prompt: two groups a step, one per host, 4 training rows (the train passes dominate the run).
OVERRIDES = [f"train.num_steps={STEPS}", "seed=7", "warm_start.steps=2", "rollout.samples_per_prompt=2",
             "rollout.max_response_tokens=16",
             "rollout.max_model_calls=4", "eval.max_response_tokens=16", "eval.max_model_calls=4",
             "algo.kl_coef=0.1", "env.num_workers=1", "eval.every_steps=2", "checkpoint.every_steps=2",
             "checkpoint.async_save=False", "log.wandb_mode=disabled"]
VOLATILE = ("time/", "rollout/", "throughput/", "mfu")  # wall-clock measurements
# Rollout log-probs come from the engine, which decodes on one device per process but on a 2-device mesh in the
# single-process run: same tokens, but XLA CPU may round the log-prob floats differently (seen: 1e-9 relative).
# Only the train-vs-rollout mismatch diagnostics read them (old log-probs are the trainer's, algo.old_logprobs).
ROLLOUT_LOGPROB_METRICS = ("mismatch_",)


def _command(workdir, splits, extra=()):
    return [sys.executable, "-m", "t3rl_jax.main", "--config=tiny", f"--config.workdir={workdir}",
            f"--config.data.splits_dir={splits}"] + [f"--config.{o}" for o in [*OVERRIDES, *extra]]


def _env(devices: int) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "WANDB_MODE": "disabled",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("T3RL_TEST_KILL_AT", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _two_processes(workdir, splits, extra=(), timeout=900):
    address = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(_command(workdir, splits, [*extra, "mesh.num_processes=2", f"mesh.process_id={i}",
                                                         f"mesh.coordinator_address={address}"]),
                              env=_env(1), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


@pytest.mark.slow
def test_two_processes_log_the_metrics_of_one(tmp_path):
    single = subprocess.run(_command(tmp_path / "single", tmp_path / "splits"), env=_env(2), cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]
    results = _two_processes(tmp_path / "multi", tmp_path / "splits")
    _assert_all_finished(results)

    want, got = _metrics(tmp_path / "single"), _metrics(tmp_path / "multi")
    # One line per step: process 1 wrote none (both appending would double them).
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    assert "kl" in got[-1] and "val/accuracy/overall" in got[-1] and "episodes/token_digest" in got[-1]
    for w, g in zip(want, got):
        w, g = ({k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in (w, g))
        assert w.keys() == g.keys(), w.keys() ^ g.keys()
        mismatched = {k: (w[k], g[k]) for k in w if w[k] != g[k] and not (
            k.startswith(ROLLOUT_LOGPROB_METRICS) and g[k] == pytest.approx(w[k], rel=1e-5))}
        assert not mismatched, (w["step"], mismatched)
    assert [r["warm_start/loss"] for r in _jsonl(tmp_path / "multi" / "warm_start.jsonl")] == \
        [r["warm_start/loss"] for r in _jsonl(tmp_path / "single" / "warm_start.jsonl")]
    assert os.path.isfile(tmp_path / "multi" / "hf_export" / "config.json")


def _assert_all_finished(results):
    """Every process exited 0 and finished; on failure, each process's reasons and its stderr tail, so that the one
    that died first (a peer only reports the closed connection) is visible."""
    failed = [f"process {i} exited {rc}; stdout tail:\n{out[-500:]}\nreasons:\n" + "\n".join(_reasons(err)) +
              f"\nstderr tail:\n{err[-1500:]}"
              for i, (rc, out, err) in enumerate(results) if rc != 0 or f"finished at step {STEPS}" not in out]
    if failed:  # pytest.fail prints the text whole; an assert's repr of it would be cut at a few hundred characters
        pytest.fail("\n\n".join(failed), pytrace=False)


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _reasons(stderr: str) -> list[str]:
    """The lines that say why a process died (an abort's stack trace alone fills the tail of stderr)."""
    keys = ("Error", "error:", "imed out", "Barrier", "DEADLINE", "heartbeat", "Gloo", "failed")
    return [line[:400] for line in stderr.splitlines() if any(k in line for k in keys) and " INFO " not in line][-12:]
