"""BFCL multi-turn scoring of finished rollouts: per-category accuracy, progress, and how the model behaved.

Accuracy is BFCL's: an entry counts only if every turn is correct. Overall accuracy is the unweighted mean of the
categories present, as the BFCL leaderboard reports it.
"""

from __future__ import annotations

import collections

import numpy as np

from environments.bfcl.catalog import CATEGORIES, parse_entry_id


def category_of(entry_id: str) -> str:
    return parse_entry_id(entry_id)[0]


def score_trajectories(trajectories) -> dict[str, float]:
    """Aggregate per-category and overall numbers from trajectories (one per entry for evaluation)."""
    by_cat: dict[str, list] = collections.defaultdict(list)
    for t in trajectories:
        by_cat[t.category or category_of(t.entry_id)].append(t)
    out: dict[str, float] = {}
    accuracies, progresses = [], []
    for cat in [c for c in CATEGORIES if c in by_cat] + sorted(set(by_cat) - set(CATEGORIES)):
        ts = by_cat[cat]
        acc = float(np.mean([t.extras.get("binary", 0.0) for t in ts]))
        prog = float(np.mean([t.extras.get("progress", 0.0) for t in ts]))
        out[f"accuracy/{cat}"] = acc
        out[f"progress/{cat}"] = prog
        out[f"entries/{cat}"] = len(ts)
        accuracies.append(acc)
        progresses.append(prog)
    calls = sum(t.num_tool_calls for t in trajectories)
    out["accuracy/overall"] = float(np.mean(accuracies)) if accuracies else 0.0
    out["progress/overall"] = float(np.mean(progresses)) if progresses else 0.0
    out["tool_call_error_rate"] = sum(t.num_tool_errors for t in trajectories) / calls if calls else 0.0
    out["format_error_rate"] = (sum(t.num_format_errors for t in trajectories)
                                / max(1, sum(t.num_model_calls for t in trajectories)))
    out["tokens_per_entry"] = float(np.mean([t.length for t in trajectories])) if trajectories else 0.0
    out["sampled_tokens_per_entry"] = float(np.mean([t.num_sampled for t in trajectories])) if trajectories else 0.0
    return out


def markdown_table(scores: dict[str, float]) -> str:
    cats = [k.split("/", 1)[1] for k in scores if k.startswith("accuracy/") and k != "accuracy/overall"]
    lines = ["| category | entries | accuracy (%) | mean progress |", "|---|---:|---:|---:|"]
    for c in cats:
        lines.append(f"| {c} | {int(scores[f'entries/{c}'])} | {100 * scores[f'accuracy/{c}']:.1f} | "
                     f"{scores[f'progress/{c}']:.3f} |")
    lines.append(f"| **overall** (mean of categories) | {sum(int(scores[f'entries/{c}']) for c in cats)} | "
                 f"**{100 * scores['accuracy/overall']:.1f}** | {scores['progress/overall']:.3f} |")
    lines.append("")
    lines.append(f"tool-call error rate {scores['tool_call_error_rate']:.3f}; format error rate "
                 f"{scores['format_error_rate']:.3f}; tokens per entry {scores['tokens_per_entry']:.0f} "
                 f"({scores['sampled_tokens_per_entry']:.0f} sampled)")
    return "\n".join(lines)


def reward_rise(rows, *, key: str = "reward/mean", n: int = 3) -> tuple[float, float]:
    """(mean of `key` over the first n logged steps, mean over the last n): the demo's learning check. Rows are
    metrics.jsonl records (dicts with "step"); steps without `key` are skipped."""
    values = [r[key] for r in sorted(rows, key=lambda r: r["step"]) if key in r]
    if len(values) < 2 * n:
        raise ValueError(f"need at least {2 * n} steps with {key!r} to compare the first and last {n}, "
                         f"got {len(values)}")
    return float(np.mean(values[:n])), float(np.mean(values[-n:]))


def reward_rise_lines(rows, *, key: str = "reward/mean", n: int = 3) -> list[str]:
    """What the demo prints last: the per-step curve and the first-n / last-n comparison."""
    first, last = reward_rise(rows, key=key, n=n)
    curve = " ".join(f"{r[key]:.2f}" for r in sorted(rows, key=lambda r: r["step"]) if key in r)
    return [f"{key} per GRPO step: {curve}",
            f"{key}: first {n} steps {first:.3f} -> last {n} steps {last:.3f} ({last - first:+.3f})"]
