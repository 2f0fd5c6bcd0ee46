"""scripts/gpu_check.py: its dry run compiles every check for an H200 on this CPU machine (what CI can prove of
the GPU path), and its bad-input paths fail with a message."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "gpu_check.py")


def _run(*args, timeout=1500):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    env.pop("XLA_FLAGS", None)  # one CPU device, as on a user's machine
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_unknown_check_is_refused():
    proc = _run("--dry_run", "--only", "parity,warp_drive", timeout=120)
    assert proc.returncode == 2
    assert "warp_drive" in proc.stderr


def test_without_a_gpu_it_points_to_the_dry_run():
    proc = _run("--only", "parity", timeout=120)
    assert proc.returncode != 0
    assert "--dry_run" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_dry_run_compiles_every_check_for_h200(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = _run("--dry_run", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == "gpu_check=passed"
    report = json.loads(out.read_text())
    assert report["dry_run"] and "H200" in report["device"]
    results = report["results"]
    assert set(results) == {"parity", "attention", "train", "decode", "tiny"}
    assert all(r["passed"] for r in results.values())
    # The train step is the real 4B one on one device, and its attention is the fused cuDNN kernel.
    train = results["train"]
    assert train["model"].startswith("36 layers, 4,022,468,096 params")
    assert train["fused_attention_in_hlo"]
    assert results["attention"]["fused_kernel_in_hlo"]
    assert results["decode"]["decode_loop"]["compile_s"] > 0
