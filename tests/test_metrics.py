import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from t3rl_jax.metrics import MetricsLogger, group_of, read_metrics, to_json_value


@pytest.fixture(autouse=True)
def quiet_offline_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")


def lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_jsonl_converts_numpy_and_jax_scalars_and_writes_nan_as_null(tmp_path):
    with MetricsLogger(tmp_path, config_dict={"seed": 0}, wandb_mode="disabled", show_progress=False) as log:
        log.log(1, {"reward/mean": np.float32(0.5), "loss/total": jnp.asarray(1.25), "kl": float("nan"),
                    "tool_calls/mean": np.int64(3), "time/step_s": jnp.asarray([2.0]), "entropy": float("inf")})
        log.log(np.int64(2), {"reward/mean": 0.75})
    assert lines(tmp_path) == [
        {"step": 1, "reward/mean": 0.5, "loss/total": 1.25, "kl": None, "tool_calls/mean": 3,
         "time/step_s": 2.0, "entropy": None},
        {"step": 2, "reward/mean": 0.75},
    ]


def test_bad_metrics_are_named(tmp_path):
    with MetricsLogger(tmp_path, config_dict=None, wandb_mode="disabled", show_progress=False) as log:
        with pytest.raises(ValueError, match="'length/all' must be a scalar.*shape \\(3,\\)"):
            log.log(1, {"length/all": np.arange(3)})
        with pytest.raises(ValueError, match="'step' is not allowed"):
            log.log(1, {"step": 3})
        with pytest.raises(TypeError, match="step must be an int"):
            log.log(1.5, {"x": 1})
    with pytest.raises(ValueError, match="unsupported type"):
        to_json_value("x", np.asarray(1 + 2j))


def test_resume_keeps_steps_up_to_checkpoint_and_equals_uninterrupted_run(tmp_path):
    def metrics(step):
        return {"reward/mean": step / 10, "loss/total": float(step)}

    uninterrupted = tmp_path / "a"
    with MetricsLogger(uninterrupted, config_dict={}, wandb_mode="disabled", show_progress=False) as log:
        for step in range(1, 7):
            log.log(step, metrics(step))

    resumed = tmp_path / "b"
    log = MetricsLogger(resumed, config_dict={}, wandb_mode="disabled", show_progress=False)
    for step in range(1, 6):  # killed after logging step 5, last checkpoint at step 3
        log.log(step, metrics(step))
    log.close()
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "rew')  # torn write from the kill
    with MetricsLogger(resumed, config_dict={}, wandb_mode="disabled", show_progress=False, resume_step=3) as log:
        assert [r["step"] for r in lines(resumed)] == [1, 2, 3]
        for step in range(4, 7):
            log.log(step, metrics(step))
    assert (resumed / "metrics.jsonl").read_text() == (uninterrupted / "metrics.jsonl").read_text()

    # A fresh (non-resumed) run in the same workdir keeps the old file aside instead of deleting it.
    MetricsLogger(resumed, config_dict={}, wandb_mode="disabled", show_progress=False).close()
    assert len(read_metrics(resumed / "metrics.prev-1.jsonl")) == 6
    assert (resumed / "metrics.jsonl").read_text() == ""


def test_wandb_offline_run_directory_under_workdir_and_resumed_id(tmp_path):
    with MetricsLogger(tmp_path, config_dict={"train": {"lr": 1e-6}}, project="t3rl-test", run_name="unit",
                       total_steps=4) as log:
        log.log(1, {"reward/mean": 0.1, "kl": float("nan")})
        run_dir = log.wandb_dir
    assert run_dir.startswith(str(tmp_path / "wandb" / "offline-run-"))
    run_id = (tmp_path / "wandb_run_id").read_text()
    assert any(name == f"run-{run_id}.wandb" for name in os.listdir(run_dir))
    with MetricsLogger(tmp_path, config_dict={}, resume_step=1, show_progress=False) as log:
        log.log(2, {"reward/mean": 0.2})
        assert log.wandb_run_id == run_id
        assert f"-{run_id}" in os.path.basename(log.wandb_dir)


def test_wandb_mode_from_environment_wins_and_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with MetricsLogger(tmp_path, config_dict={}, wandb_mode="online", show_progress=False) as log:
        assert log.wandb_dir is None
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ValueError, match="WANDB_MODE='sometimes'"):
        MetricsLogger(tmp_path, config_dict={})


def test_groups_of_metric_names():
    assert group_of("reward/mean") == "reward"
    assert group_of("progress/miss_func") == "progress"
    assert group_of("throughput/tokens_per_s") == "throughput"
    assert group_of("time/rollout_s") == "timing"
    assert group_of("clip_fraction") == "loss"
    assert group_of("length/response_mean") == "lengths"
    assert group_of("something_else") == "other"


def test_plot_metrics_writes_one_png_per_group(tmp_path):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    from plot_metrics import main
    from t3rl_jax.plots import plot_metrics

    with MetricsLogger(tmp_path, config_dict={}, wandb_mode="disabled", show_progress=False) as log:
        for step in range(1, 5):
            log.log(step, {"reward/mean": step / 4, "progress/base": 0.1 * step, "loss/total": 1 / step,
                           "kl": float("nan") if step == 2 else 0.01, "length/response_mean": 100 + step,
                           "time/rollout_s": 3.0, "throughput/tokens_per_s": 1e3, "note": "text is skipped"})
    written = plot_metrics(str(tmp_path))
    names = sorted(os.path.basename(p) for p in written)
    assert names == ["lengths.png", "loss.png", "progress.png", "reward.png", "throughput.png", "timing.png"]
    for path in written:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(path) > 1000
    assert main(["--workdir", str(tmp_path), "--out", str(tmp_path / "sel"), "--keys", "kl,reward/mean"]) == 0
    assert sorted(os.listdir(tmp_path / "sel")) == ["loss.png", "reward.png"]
    with pytest.raises(ValueError, match=r"\['nope'\] are not in"):
        plot_metrics(str(tmp_path), keys=["nope"])
    with pytest.raises(FileNotFoundError, match="metrics.jsonl does not exist"):
        plot_metrics(str(tmp_path / "empty"))
