import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from t3rl_jax.checkpointing import CheckpointMismatchError, Checkpointer, SigtermFlag, restore_params_only


def make_params(seed=0, width=8):
    rng = np.random.default_rng(seed)
    return {
        "embed": jnp.asarray(rng.normal(size=(16, width)), jnp.float32),
        "layers": {"q_proj": jnp.asarray(rng.normal(size=(2, width, width)), jnp.float32),
                   "norm": jnp.asarray(rng.normal(size=(2, width)), jnp.float32)},
    }


def make_opt_state(params):
    opt = optax.adamw(1e-2, weight_decay=0.01)
    state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = opt.update(grads, state, params)  # non-trivial mu / nu / count
    return state


def abstract(tree, sharding=None):
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_restores_params_opt_state_and_extra_onto_given_sharding(tmp_path):
    params = make_params()
    opt_state = make_opt_state(params)
    extra = {"data": {"next_index": 7}, "rng": [0, 42], "nan_steps": 1}
    with Checkpointer(tmp_path / "ckpt", keep=2, async_save=False) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(3, params=params, opt_state=opt_state, extra=extra)
        assert not ckpt.save(3, params=params, opt_state=opt_state, extra=extra)  # same step: no-op
        assert ckpt.latest_step() == 3

    mesh = jax.make_mesh((len(jax.devices()),), ("fsdp",), axis_types=(jax.sharding.AxisType.Explicit,))
    sharded = NamedSharding(mesh, P("fsdp"))  # leading dims 16 and 2 divide / replicate across 8 devices
    abs_params = {"embed": jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=sharded),
                  "layers": abstract(params["layers"])}
    reopened = Checkpointer(tmp_path / "ckpt", keep=2, async_save=False)
    step, got_params, got_opt, got_extra = reopened.restore(abstract_params=abs_params,
                                                            abstract_opt_state=abstract(opt_state))
    reopened.close()
    assert step == 3 and got_extra == extra
    assert_trees_equal(got_params, params)
    assert_trees_equal(got_opt, opt_state)
    assert type(got_opt[0]).__name__ == "ScaleByAdamState"
    assert got_params["embed"].sharding == sharded


def test_keep_n_prunes_oldest(tmp_path):
    params = make_params()
    opt_state = make_opt_state(params)
    ckpt = Checkpointer(tmp_path, keep=2, async_save=False)
    for step in (1, 2, 3, 4):
        ckpt.save(step, params=params, opt_state=opt_state, extra={"step": step})
    ckpt.wait()
    assert ckpt.all_steps() == [3, 4]
    assert sorted(p for p in os.listdir(tmp_path) if p.isdigit()) == ["3", "4"]
    _, _, _, extra = ckpt.restore(3, abstract_params=abstract(params), abstract_opt_state=abstract(opt_state))
    assert extra == {"step": 3}
    with pytest.raises(FileNotFoundError, match="step 1 .*holds steps \\[3, 4\\]"):
        ckpt.restore(1, abstract_params=abstract(params))
    ckpt.close()


def test_async_save_then_wait_is_restorable_and_caller_may_overwrite_arrays(tmp_path):
    params = make_params(seed=1)
    opt_state = make_opt_state(params)
    ckpt = Checkpointer(tmp_path, keep=3, async_save=True)
    ckpt.save(5, params=params, opt_state=opt_state, extra={"k": "v"})
    expected = jax.tree.map(np.asarray, params)
    params = jax.tree.map(lambda x: x + 1.0, params)  # the loop moves on while the save runs
    ckpt.wait()
    step, restored, opt, extra = ckpt.restore(abstract_params=abstract(params))
    ckpt.close()
    assert step == 5 and opt is None and extra == {"k": "v"}
    assert_trees_equal(restored, expected)


def test_other_model_shape_names_the_tensor_and_both_shapes(tmp_path):
    params = make_params(width=8)
    ckpt = Checkpointer(tmp_path, keep=1, async_save=False)
    ckpt.save(1, params=params, opt_state=make_opt_state(params), extra={})
    wider = make_params(width=12)
    with pytest.raises(CheckpointMismatchError, match=r"'embed' has shape \(16, 8\) in the checkpoint but \(16, 12\)"):
        ckpt.restore(abstract_params=abstract(wider))
    renamed = {"embed": params["embed"], "layers": {"k_proj": params["layers"]["q_proj"],
                                                    "norm": params["layers"]["norm"]}}
    with pytest.raises(CheckpointMismatchError, match="'layers/k_proj'.*not in the checkpoint"):
        ckpt.restore(abstract_params=abstract(renamed))
    with pytest.raises(CheckpointMismatchError, match="opt_state tensor '0/mu/embed'"):
        ckpt.restore(abstract_params=abstract(params), abstract_opt_state=abstract(make_opt_state(wider)))
    ckpt.close()


def test_restore_params_only_from_run_dir_step_dir_and_missing(tmp_path):
    params = make_params(seed=2)
    ckpt = Checkpointer(tmp_path / "run", keep=2, async_save=False)
    ckpt.save(4, params=params, opt_state=make_opt_state(params), extra={})
    ckpt.close()
    assert_trees_equal(restore_params_only(tmp_path / "run", abstract(params)), params)
    assert_trees_equal(restore_params_only(tmp_path / "run" / "4", abstract(params)), params)
    with pytest.raises(CheckpointMismatchError, match=r"'embed' has shape \(16, 8\) in the checkpoint but \(16, 4\)"):
        restore_params_only(tmp_path / "run" / "4", abstract(make_params(width=4)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        restore_params_only(tmp_path / "nowhere", abstract(params))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a params/ tree nor numbered step"):
        restore_params_only(tmp_path / "empty", abstract(params))


def test_sigterm_sets_flag_and_close_restores_previous_handler():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        flag = SigtermFlag()
        assert not flag
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.is_set and bool(flag)
        assert seen == []  # the flag's handler replaced the old one
        flag.close()
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_round_trip_of_optax_state_over_nnx_params(tmp_path):
    # The trainer's optimizer state mirrors nnx.State params, whose Variables Orbax stores under `value`.
    import optax
    from flax import nnx

    class Tiny(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.arange(6.0).reshape(2, 3))

    params = nnx.state(Tiny(), nnx.Param)
    opt = optax.adamw(1e-3)
    state = opt.init(params)
    ckpt = Checkpointer(tmp_path / "c", keep=1, async_save=False)
    ckpt.save(1, params=nnx.to_pure_dict(params), opt_state=state, extra={})
    abstract = jax.eval_shape(opt.init, params)
    _, _, restored, _ = ckpt.restore(abstract_params=nnx.to_pure_dict(params), abstract_opt_state=abstract)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ckpt.close()


def _truncate_one_array_file(step_dir):
    """Cut the largest array-data file of `step_dir/params` in half (a disk-full or torn copy). Arrays must be a
    few KB at least: OCDBT stores small ones inline in its index nodes."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "params")) for f in fs
             if os.path.basename(d) == "d"]
    victim = max(files, key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    return victim


def test_reference_item_round_trips_and_a_missing_one_is_named(tmp_path):
    params, reference = make_params(0), make_params(1)
    opt_state = make_opt_state(params)
    with Checkpointer(tmp_path, keep=3, async_save=False) as ckpt:
        ckpt.save(1, params=params, opt_state=opt_state, extra={}, reference=reference)
        ckpt.save(2, params=params, opt_state=opt_state, extra={})
        step, items = ckpt.restore_items(1, params=abstract(params), reference=abstract(reference))
        assert step == 1
        assert_trees_equal(items["reference"], reference)
        assert_trees_equal(items["params"], params)
        with pytest.raises(CheckpointMismatchError, match=r"ckpt.*2 holds no 'reference'|/2 holds no 'reference'"):
            ckpt.restore_items(2, params=abstract(params), reference=abstract(reference))
        wrong = {"embed": jnp.zeros((16, 4)), "layers": reference["layers"]}
        with pytest.raises(CheckpointMismatchError, match="reference tensor 'embed' has shape"):
            ckpt.restore_items(1, params=abstract(params), reference=abstract(wrong))


def test_damaged_latest_step_falls_back_to_the_newest_readable_one(tmp_path, caplog):
    from t3rl_jax.checkpointing import CheckpointUnreadableError

    # Written by another process, as on a real resume: TensorStore's in-process cache would serve this process's
    # own writes and hide the damage.
    script = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import test_checkpointing as t; "
              "from t3rl_jax.checkpointing import Checkpointer\n"
              "with Checkpointer(sys.argv[3], keep=3, async_save=False) as c:\n"
              "    [c.save(s, params=t.make_params(s, 256), opt_state=t.make_opt_state(t.make_params(0, 256)), "
              "extra={'step': s})"
              " for s in (1, 2, 3)]")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, "-c", script, os.path.dirname(tests_dir), tests_dir, str(tmp_path)], check=True,
                   env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    opt_state = make_opt_state(make_params(0, 256))
    _truncate_one_array_file(tmp_path / "3")
    ckpt = Checkpointer(tmp_path, keep=3, async_save=False)
    with caplog.at_level("WARNING"):
        step, items, skipped = ckpt.restore_newest_readable(params=abstract(make_params(0, 256)),
                                                            opt_state=abstract(opt_state))
    assert step == 2 and items["extra"] == {"step": 2}
    assert_trees_equal(items["params"], make_params(2, 256))
    assert [s for s, _ in skipped] == [3] and "3 is unreadable" in caplog.text
    _truncate_one_array_file(tmp_path / "2")
    _truncate_one_array_file(tmp_path / "1")
    with pytest.raises(CheckpointUnreadableError, match=r"no readable checkpoint in .*step 3: .*step 2: .*step 1: "
                                                        r".*--config.resume=never"):
        ckpt.restore_newest_readable(params=abstract(make_params(0, 256)), opt_state=abstract(opt_state))
    ckpt.close()


def test_sigkill_inside_the_async_commit_leaves_only_a_temporary_directory_and_resume_ignores_it(tmp_path):
    # Another process saves steps 1 and 2 asynchronously; "commit:2" SIGKILLs it from Orbax's commit thread once
    # step 2's optimizer arrays are written, before the step is committed. Its main thread waits on the save.
    script = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import test_checkpointing as t; "
              "from t3rl_jax.checkpointing import Checkpointer\n"
              "c = Checkpointer(sys.argv[3], keep=3, async_save=True)\n"
              "for s in (1, 2):\n"
              "    c.save(s, params=t.make_params(s, 64), opt_state=t.make_opt_state(t.make_params(0, 64)), "
              "extra={'step': s})\n"
              "    c.wait()\n"
              "print('not killed')")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    killed = subprocess.run([sys.executable, "-c", script, os.path.dirname(tests_dir), tests_dir, str(tmp_path)],
                            env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
                                 "T3RL_TEST_KILL_AT": "commit:2"}, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert "not killed" not in killed.stdout
    assert "inside the async commit of step 2" in killed.stderr and "on disk: True" in killed.stderr
    temporary = [p.name for p in tmp_path.iterdir() if p.name.startswith("2.") and "tmp" in p.name]
    assert len(temporary) == 1, sorted(os.listdir(tmp_path))
    written = [p for p in (tmp_path / temporary[0]).rglob("*") if p.is_file() and "opt_state" in str(p)]
    assert any("ocdbt" in str(p) for p in written), written  # the killed step's optimizer arrays were on disk
    assert not (tmp_path / "2").exists() and (tmp_path / "1").is_dir()

    ckpt = Checkpointer(tmp_path, keep=3, async_save=True)
    assert ckpt.all_steps() == [1]
    opt_state = make_opt_state(make_params(0, 64))
    step, items, skipped = ckpt.restore_newest_readable(params=abstract(make_params(0, 64)),
                                                        opt_state=abstract(opt_state))
    assert (step, skipped, items["extra"]) == (1, [], {"step": 1})
    assert_trees_equal(items["params"], make_params(1, 64))
    assert_trees_equal(items["opt_state"], opt_state)
    ckpt.save(2, params=make_params(2, 64), opt_state=opt_state, extra={"step": 2})
    ckpt.close()
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]  # the interrupted save's temporary directory is cleaned up
