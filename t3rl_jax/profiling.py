"""XLA profiling: a trace window over training steps, named scopes, HLO dumps, and a top-ops summary of a trace.

A trace is written under `WORKDIR/profile/plugins/profile/<run>/` as `<host>.xplane.pb` (what xprof and
TensorBoard's profile plugin read) plus `<host>.trace.json.gz` (Chrome/Perfetto trace events). Open it with

    xprof --logdir WORKDIR/profile --port 8791        # or: tensorboard --logdir WORKDIR/profile

`ProfileSession.port` > 0 also starts JAX's profiler server, so a trace can be captured on demand from a running
job (xprof's "Capture profile" button, pointed at localhost:PORT).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import gzip
import json
import os

import jax

# The phases of one RL step that the trainer and engine annotate; `scope` accepts only these names, so traces of
# different runs line up.
SCOPES = ("rollout", "prefill", "decode", "env", "train", "train-fwd", "train-bwd", "optimizer", "checkpoint", "eval")


@contextlib.contextmanager
def scope(name: str):
    """Annotate a region in the profiler timeline (host side) and in the HLO op names traced inside it.

    `jax.profiler.TraceAnnotation` marks the wall-clock span on the host thread; `jax.named_scope` prefixes the
    names of the XLA ops traced in it (visible in xprof's op views and in HLO dumps). Both cost nothing when no
    trace is being recorded.
    """
    if name not in SCOPES:
        raise ValueError(f"unknown profiling scope {name!r}; use one of {', '.join(SCOPES)}")
    with jax.profiler.TraceAnnotation(name), jax.named_scope(name):
        yield


class ProfileSession:
    """Traces steps [start_step, start_step + num_steps) of a loop; num_steps = 0 turns tracing off.

        session = ProfileSession(workdir, start_step=5, num_steps=3, port=0)
        for step in range(...):
            with session.step(step):
                ...
        session.close()

    Tracing starts at the first step >= start_step (so a resumed run still traces its window) and stops after
    num_steps traced steps, or at `close()`. Each step is a `StepTraceAnnotation`, which xprof's step views use.
    """

    def __init__(self, workdir: str, *, start_step: int, num_steps: int, port: int = 0):
        for name, value in (("start_step", start_step), ("num_steps", num_steps), ("port", port)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"profile.{name} must be a non-negative int, got {value!r}")
        if port > 65535:
            raise ValueError(f"profile.port must be <= 65535, got {port}")
        self.trace_dir = os.path.join(workdir, "profile")
        self.start_step = start_step
        self.num_steps = num_steps
        self.port = port
        self._traced = 0
        self._active = False
        self._server = jax.profiler.start_server(port) if port else None

    @property
    def active(self) -> bool:
        return self._active

    @property
    def done(self) -> bool:
        return self._traced >= self.num_steps

    @contextlib.contextmanager
    def step(self, step: int):
        if not self._active and not self.done and step >= self.start_step:
            os.makedirs(self.trace_dir, exist_ok=True)
            try:
                jax.profiler.start_trace(self.trace_dir)
            except RuntimeError as e:
                raise RuntimeError(f"could not start the profiler trace into {self.trace_dir} at step {step} "
                                   f"(is another trace running?): {e}") from e
            self._active = True
        try:
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                yield
        finally:
            if self._active:
                self._traced += 1
                if self.done:
                    self._stop()

    def _stop(self):
        self._active = False
        jax.profiler.stop_trace()

    def close(self):
        """Stop a trace still running (loop ended inside the window) and the profiler server."""
        if self._active:
            self._stop()
        if self._server is not None:
            jax.profiler.stop_server()
            self._server = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def dump_hlo(jitted_fn, *args, path: str, **kwargs) -> str:
    """Write the optimized (post-compilation) HLO text of `jitted_fn(*args, **kwargs)` to `path`; returns path.

    Arguments may be arrays or `jax.ShapeDtypeStruct`s; nothing runs. The text is what XLA executes (fusions,
    layouts, collectives), the thing to read when a profile shows an unexpected op.
    """
    if not hasattr(jitted_fn, "lower"):
        raise TypeError(f"dump_hlo needs a jax.jit-wrapped function, got {type(jitted_fn).__name__}")
    text = jitted_fn.lower(*args, **kwargs).compile().as_text()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


# --- reading traces back ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TraceFiles:
    run_dir: str
    xplane: tuple[str, ...]      # <host>.xplane.pb: xprof / TensorBoard input
    trace_json: tuple[str, ...]  # <host>.trace.json.gz: Chrome trace events


def latest_trace(trace_dir: str) -> TraceFiles:
    """The newest trace run under `trace_dir` (a ProfileSession's `trace_dir`, i.e. WORKDIR/profile)."""
    runs = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*")))
    if not runs:
        raise FileNotFoundError(f"no profiler trace under {trace_dir} (expected plugins/profile/<run>/)")
    run = runs[-1]
    files = TraceFiles(run, tuple(sorted(glob.glob(os.path.join(run, "*.xplane.pb")))),
                       tuple(sorted(glob.glob(os.path.join(run, "*.trace.json.gz")))))
    if not files.xplane:
        raise FileNotFoundError(f"trace run {run} has no .xplane.pb file")
    return files


def xprof_tool(files: TraceFiles, tool: str):
    """Convert a trace offline with xprof (the same converter its UI uses); returns the tool's raw data.

    E.g. tool="trace_viewer" (Chrome JSON), "overview_page", "framework_op_stats", "hlo_stats". Raises if xprof
    cannot convert it.
    """
    from xprof.convert import raw_to_tool_data

    data, _ = raw_to_tool_data.xspace_to_tool_data(list(files.xplane), tool, {})
    if data is None:
        raise ValueError(f"xprof could not produce {tool!r} from {files.run_dir}")
    return data


# XLA:CPU runtime spans around the ops (mostly waiting for worker threads), not ops themselves.
_RUNTIME_EVENTS = ("ThunkExecutor::", "ThreadpoolListener::", "end: ")


@dataclasses.dataclass(frozen=True)
class OpTime:
    name: str
    self_us: float  # time in the op itself, not in ops nested inside it (loop bodies, called computations)
    count: int


def _op_threads(events) -> set:
    """(pid, tid) of threads that run XLA ops: device processes (`/device:...`, GPUs/TPUs) when there are any,
    else the XLA CPU executor threads (`tf_XLA...`); the Python thread's annotations are not ops."""
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device = {key for key in threads if procs.get(key[0], "").startswith("/device:")}
    device |= {(e["pid"], e.get("tid")) for e in events
               if e.get("ph") == "X" and procs.get(e["pid"], "").startswith("/device:")}
    if device:
        return device
    return {key for key, name in threads.items() if name.startswith("tf_XLA")}


def op_self_times(trace_json_gz: str) -> list[OpTime]:
    """Every op's self time in a `.trace.json.gz`, summed over occurrences by name, largest first."""
    with gzip.open(trace_json_gz, "rt") as f:
        events = json.load(f).get("traceEvents", [])
    keep = _op_threads(events)
    by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and (e["pid"], e.get("tid")) in keep and not e["name"].startswith(_RUNTIME_EVENTS):
            by_thread[(e["pid"], e.get("tid"))].append(e)
    self_time = collections.Counter()
    count = collections.Counter()
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
        stack = []  # (end time, name) of the enclosing events
        for e in evs:
            dur = float(e.get("dur", 0))
            while stack and stack[-1][0] <= e["ts"]:
                stack.pop()
            if stack:
                self_time[stack[-1][1]] -= dur
            self_time[e["name"]] += dur
            count[e["name"]] += 1
            stack.append((e["ts"] + dur, e["name"]))
    ranked = sorted(self_time.items(), key=lambda kv: -kv[1])
    return [OpTime(name, us, count[name]) for name, us in ranked]


def format_top_ops(ops: list[OpTime], n: int = 20) -> str:
    """A table of the first `n` of `ops` (from op_self_times) with each one's share of all ops' time."""
    total = sum(o.self_us for o in ops) or 1.0
    lines = [f"{'self ms':>10} {'share':>6} {'count':>6}  op"]
    lines += [f"{o.self_us / 1e3:10.2f} {100 * o.self_us / total:5.1f}% {o.count:6d}  {o.name}" for o in ops[:n]]
    return "\n".join(lines)
