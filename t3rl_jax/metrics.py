"""Per-step metrics: `WORKDIR/metrics.jsonl`, wandb (offline by default) and a progress bar.

    logger = MetricsLogger(workdir, config_dict=cfg.to_dict(), wandb_mode=cfg.log.wandb_mode,
                           project=cfg.log.wandb_project, resume_step=restored_step_or_None,
                           total_steps=cfg.train.num_steps)
    logger.log(step, {"reward/mean": 0.4, "loss/total": loss, "time/step_s": 12.0})
    logger.close()

`metrics.jsonl` holds one JSON object per `log` call: `{"step": N, <metric>: value, ...}`. Values may be
Python, numpy or jax scalars (size-1 arrays too); they are written as plain numbers, NaN and +-inf as null.
No wall-clock fields are added, so a resumed run writes the same file as an uninterrupted one:
`resume_step=k` keeps the lines with step <= k and drops later ones (the steps after the checkpoint are
redone). `resume_step=None` starts afresh; an existing file is kept aside as `metrics.prev-N.jsonl`.

Metric names are slash-separated, group first; `scripts/plot_metrics.py` groups curves by these names
(see `METRIC_GROUPS`): reward/*, progress/<category>, accuracy/<category> and val/*, loss/*, kl, entropy,
clip_fraction, grad_norm, length/*, tool_calls/*, errors/*, time/*_s, throughput/*, mfu.

wandb: mode `offline` (default), `online` or `disabled`; the environment's `WANDB_MODE` wins when set. Its
files go under WORKDIR/wandb; the run id is kept in WORKDIR/wandb_run_id so a resumed run continues the same
wandb run. Only the primary process (`is_primary=True`) writes anything.
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["METRIC_GROUPS", "METRICS_FILE", "MetricsLogger", "group_of", "read_metrics", "to_json_value"]

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id"
WANDB_MODES = ("offline", "online", "disabled")
# Ordered: the first pattern that matches a metric name decides its group (throughput before timing,
# since tokens_per_s also ends in _s).
METRIC_GROUPS: tuple[tuple[str, str], ...] = (
    ("reward", r"^reward"),
    ("progress", r"^(progress|accuracy|val)(/|_)"),
    ("throughput", r"(^throughput|per_s$|^mfu)"),
    ("timing", r"(^time|_s$)"),
    ("loss", r"(^loss|^kl|entropy|clip|grad_norm|^ratio|^tis|mismatch|^lr$|nan)"),
    ("lengths", r"(^length|tokens|^tool_calls|^turns|^steps|^errors|^groups)"),
)
DEFAULT_PROGRESS_KEYS = ("reward/mean", "loss/total", "loss", "kl", "time/step_s")


def group_of(name: str) -> str:
    """The plot group of metric `name` ('other' when no pattern matches)."""
    for group, pattern in METRIC_GROUPS:
        if re.search(pattern, name):
            return group
    return "other"


def to_json_value(name: str, value: Any):
    """A JSON-able value for one metric; non-finite numbers become None."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value if not isinstance(value, float) or math.isfinite(value) else None
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"metric {name!r} must be a scalar, got an array of shape {array.shape}")
    item = array.reshape(()).item()
    if isinstance(item, complex) or not isinstance(item, (bool, int, float)):
        raise ValueError(f"metric {name!r} has unsupported type {type(value).__name__}")
    if isinstance(item, float) and not math.isfinite(item):
        return None
    return item


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file; a torn last line (process killed mid-write) is skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines) - 1:  # a bad line in the middle is real damage, not an interrupted write
                raise ValueError(f"{path}:{n}: not a JSON line") from None
    return records


def _truncate_after(path: str, step: int) -> None:
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in kept:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def _keep_aside(path: str) -> None:
    n = 1
    while os.path.exists(aside := os.path.join(os.path.dirname(path), f"metrics.prev-{n}.jsonl")):
        n += 1
    os.replace(path, aside)


class MetricsLogger:
    """See the module docstring."""

    def __init__(self, workdir: str | os.PathLike, *, config_dict: Mapping[str, Any] | None,
                 wandb_mode: str = "offline", project: str = "t3rl-jax", run_name: str | None = None,
                 resume_step: int | None = None, total_steps: int | None = None,
                 progress_keys: Sequence[str] = DEFAULT_PROGRESS_KEYS, show_progress: bool = True,
                 is_primary: bool = True):
        mode = os.environ.get("WANDB_MODE") or wandb_mode
        if mode not in WANDB_MODES:
            source = "environment variable WANDB_MODE" if os.environ.get("WANDB_MODE") else "log.wandb_mode"
            raise ValueError(f"{source}={mode!r} is not one of {', '.join(WANDB_MODES)}")
        if resume_step is not None and resume_step < 0:
            raise ValueError(f"resume_step must be >= 0, got {resume_step}")
        self.workdir = os.path.abspath(os.fspath(workdir))
        self.path = os.path.join(self.workdir, METRICS_FILE)
        self.is_primary = is_primary
        self.progress_keys = tuple(progress_keys)
        self._file = self._run = self._bar = None
        if not is_primary:
            return
        os.makedirs(self.workdir, exist_ok=True)
        if os.path.exists(self.path):
            if resume_step is None:
                _keep_aside(self.path)
            else:
                _truncate_after(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._run = self._start_wandb(mode, project, run_name, config_dict, resumed=resume_step is not None)
        if show_progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=resume_step or 0, unit="step", dynamic_ncols=True)

    def _start_wandb(self, mode, project, run_name, config_dict, *, resumed: bool):
        if mode == "disabled":
            return None
        import wandb

        id_file = os.path.join(self.workdir, WANDB_ID_FILE)
        if resumed and os.path.exists(id_file):
            with open(id_file) as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            with open(id_file, "w") as f:
                f.write(run_id)
        kwargs = dict(dir=self.workdir, project=project, name=run_name, config=dict(config_dict or {}), mode=mode)
        try:
            return wandb.init(id=run_id, resume="allow", **kwargs)
        except Exception as e:  # noqa: BLE001 - logging must never block a resume
            # After a hard kill the old run's wandb service can still hold its id ("run ID ... is in use"):
            # continue in a fresh wandb run; metrics.jsonl stays the one continuous record.
            warnings.warn(f"wandb could not resume run {run_id} ({e}); logging to a new wandb run")
            run_id = uuid.uuid4().hex[:12]
            with open(id_file, "w") as f:
                f.write(run_id)
            return wandb.init(id=run_id, **kwargs)

    @property
    def wandb_dir(self) -> str | None:
        """The wandb run's local directory (None when wandb is disabled)."""
        return os.path.dirname(self._run.dir) if self._run is not None else None

    @property
    def wandb_run_id(self) -> str | None:
        return self._run.id if self._run is not None else None

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Write one record for `step`; returns the JSON-able record written."""
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool):
            raise TypeError(f"step must be an int, got {step!r}")
        record: dict[str, Any] = {"step": int(step)}
        for name, value in metrics.items():
            if not isinstance(name, str) or name == "step":
                raise ValueError(f"metric name {name!r} is not allowed (a str other than 'step')")
            record[name] = to_json_value(name, value)
        if not self.is_primary:
            return record
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._run is not None:
            numbers = {k: (float("nan") if v is None else v) for k, v in record.items() if k != "step"
                       and not isinstance(v, str)}
            self._run.log(numbers, step=int(step))
        if self._bar is not None:
            self._update_bar(int(step), record)
        return record

    def _update_bar(self, step: int, record: dict[str, Any]) -> None:
        shown = [k for k in self.progress_keys if k in record] or [k for k in record if k != "step"][:3]
        self._bar.set_postfix({k: record[k] for k in shown}, refresh=False)
        self._bar.update(max(0, step - self._bar.n))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._run is not None:
            self._run.finish()
            self._run = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
