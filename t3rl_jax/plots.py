"""PNG curves from a run's metrics.jsonl, one file per metric group, one panel per metric.

    python scripts/plot_metrics.py --workdir runs/tiny [--out DIR] [--keys reward/mean,kl]
    plot_metrics(workdir, out_dir=None, keys=None)   # the trainer calls this at the end of a run

Groups follow `t3rl_jax.metrics.METRIC_GROUPS` (reward, progress, loss, lengths, timing, throughput, other);
files are `DIR/<group>.png` (DIR defaults to WORKDIR/plots). Null values (NaN when logged) leave gaps.
Importable: `plot_metrics(workdir, out_dir=None, keys=None) -> list of written paths`.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from t3rl_jax.metrics import METRIC_GROUPS, METRICS_FILE, group_of, read_metrics  # noqa: E402

GROUP_ORDER = [name for name, _ in METRIC_GROUPS] + ["other"]


def metric_series(records) -> dict[str, tuple[list[int], list[float]]]:
    """{metric: (steps, values)} over numeric metrics; null becomes NaN."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        step = record.get("step")
        for key, value in record.items():
            numeric = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
            if key == "step" or not numeric:
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(step)
            values.append(math.nan if value is None else float(value))
    return series


def _plot_group(group: str, keys: list[str], series, path: str) -> None:
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        steps, values = series[key]
        ax.plot(steps, values, marker="." if len(steps) < 50 else None, linewidth=1.2)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(group)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_metrics(workdir: str, out_dir: str | None = None, keys=None) -> list[str]:
    """Write one PNG per metric group present in WORKDIR/metrics.jsonl; returns the paths written."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: run training with workdir={workdir} first")
    series = metric_series(read_metrics(path))
    if keys:
        missing = [k for k in keys if k not in series]
        if missing:
            raise ValueError(f"metrics {missing} are not in {path}; it has {sorted(series)}")
        series = {k: series[k] for k in keys}
    if not series:
        raise ValueError(f"{path} holds no numeric metrics to plot")
    groups: dict[str, list[str]] = defaultdict(list)
    for key in sorted(series):
        groups[group_of(key)].append(key)
    out_dir = out_dir or os.path.join(workdir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for group in GROUP_ORDER:
        if group in groups:
            file = os.path.join(out_dir, f"{group}.png")
            _plot_group(group, groups[group], series, file)
            written.append(file)
    return written
