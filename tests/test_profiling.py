import gzip
import json
import os

import jax
import jax.numpy as jnp
import portpicker
import pytest

from t3rl_jax import profiling


def _step_fn():
    @jax.jit
    def f(x):
        with profiling.scope("train-fwd"):
            return jnp.tanh(x @ x.T).sum()

    return f


def _run_loop(session, n_steps):
    f, x = _step_fn(), jnp.ones((64, 64))
    for step in range(n_steps):
        with session.step(step):
            with profiling.scope("rollout"):
                jax.block_until_ready(f(x))


def _events(trace_json_gz):
    with gzip.open(trace_json_gz, "rt") as fh:
        return json.load(fh)["traceEvents"]


def test_window_of_steps_is_traced_and_converts_with_xprof(tmp_path):
    session = profiling.ProfileSession(str(tmp_path), start_step=2, num_steps=2, port=0)
    _run_loop(session, 6)
    assert session.done and not session.active
    files = profiling.latest_trace(os.path.join(tmp_path, "profile"))
    assert files.xplane and files.trace_json
    assert all(os.path.getsize(p) > 0 for p in files.xplane + files.trace_json)

    # xprof's own offline converter (what its UI and TensorBoard's plugin serve) reads the xplane file.
    viewer = json.loads(profiling.xprof_tool(files, "trace_viewer"))
    names = {e.get("name") for e in viewer["traceEvents"]}
    assert "rollout" in names  # our scope, as xprof shows it
    steps = sorted(int(e["args"]["step_num"]) for e in _events(files.trace_json[0]) if e.get("name") == "train")
    assert steps == [2, 3]

    ops = profiling.op_self_times(files.trace_json[0])
    assert ops and ops[0].self_us > 0 and ops[0].count >= 1
    assert all(not o.name.startswith(("ThunkExecutor::", "train", "rollout")) for o in ops)


def test_session_off_writes_nothing_and_close_ends_an_open_window(tmp_path):
    off = profiling.ProfileSession(str(tmp_path / "off"), start_step=0, num_steps=0)
    _run_loop(off, 2)
    assert not os.path.exists(tmp_path / "off" / "profile")

    # The loop ends inside the window (and resumes past start_step): close() must still stop and flush it.
    with profiling.ProfileSession(str(tmp_path / "cut"), start_step=1, num_steps=10) as cut:
        f, x = _step_fn(), jnp.ones((8, 8))
        for step in (3, 4):
            with cut.step(step):
                jax.block_until_ready(f(x))
        assert cut.active
    assert not cut.active
    assert profiling.latest_trace(str(tmp_path / "cut" / "profile")).xplane


def test_profiler_server_starts_on_the_port_and_stops(tmp_path):
    port = portpicker.pick_unused_port()
    session = profiling.ProfileSession(str(tmp_path), start_step=0, num_steps=0, port=port)
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    session.close()


def test_dump_hlo_writes_optimized_hlo_with_scope_names(tmp_path):
    path = profiling.dump_hlo(_step_fn(), jax.ShapeDtypeStruct((16, 16), jnp.float32),
                              path=str(tmp_path / "hlo" / "train_step.txt"))
    text = open(path).read()
    assert "HloModule" in text and "ENTRY" in text
    assert "train-fwd" in text  # named_scope reaches the op metadata
    with pytest.raises(TypeError, match="jax.jit"):
        profiling.dump_hlo(lambda x: x, 1, path=str(tmp_path / "x.txt"))


def test_op_self_times_subtracts_nested_ops(tmp_path):
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "tf_XLACpu/1"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "python"}}]
    ops = [("while.1", 0, 100), ("fusion.a", 10, 30), ("fusion.b", 50, 20), ("fusion.a", 200, 5),
           ("ThunkExecutor::Execute", 300, 50)]
    events = meta + [{"ph": "X", "pid": 1, "tid": 7, "name": n, "ts": ts, "dur": d} for n, ts, d in ops]
    events.append({"ph": "X", "pid": 1, "tid": 8, "name": "rollout", "ts": 0, "dur": 1000})
    path = tmp_path / "t.trace.json.gz"
    with gzip.open(path, "wt") as fh:
        json.dump({"traceEvents": events}, fh)
    got = {o.name: (o.self_us, o.count) for o in profiling.op_self_times(str(path))}
    assert got == {"while.1": (50.0, 1), "fusion.a": (35.0, 2), "fusion.b": (20.0, 1)}
    table = profiling.format_top_ops(profiling.op_self_times(str(path)), n=2)
    assert "while.1" in table and "fusion.b" not in table


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="num_steps"):
        profiling.ProfileSession(str(tmp_path), start_step=0, num_steps=-1)
    with pytest.raises(ValueError, match="port"):
        profiling.ProfileSession(str(tmp_path), start_step=0, num_steps=1, port=70000)
    with pytest.raises(ValueError, match="unknown profiling scope 'forward'"):
        with profiling.scope("forward"):
            pass
    with pytest.raises(FileNotFoundError, match="no profiler trace"):
        profiling.latest_trace(str(tmp_path))
