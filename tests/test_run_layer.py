"""The run layer's parts on the tiny preset with 8 fake devices: setup allocates nothing and names mesh problems,
the TrainState round-trips whole (the KL reference stays the initial policy), validation requests, metric cadence,
and --chain's overrides."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from t3rl_jax import sharding as sh
from t3rl_jax.checkpointing import CheckpointMismatchError, Checkpointer
from t3rl_jax.config import ConfigError, load_config
from t3rl_jax.main import chained_overrides
from t3rl_jax.run import hooks, state as state_lib
from t3rl_jax.run.setup import build_setup, check_mesh

MESH = ["mesh.fsdp=2", "mesh.sequence=2", "train.micro_batch_size=4", "train.max_seq_len=4352",
        "rollout.max_context_tokens=4352"]


@pytest.fixture(scope="module")
def setup():
    return build_setup(load_config("tiny", MESH + ["algo.kl_coef=0.1"]))


def test_setup_builds_every_sharding_without_allocating(setup):
    assert dict(setup.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 1, "sequence": 2}
    assert setup.cp == 2 and setup.rows_per_micro == 4
    leaves = jax.tree.leaves(setup.bundle.abstract_params) + jax.tree.leaves(setup.abstract_opt)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None for x in leaves)


@pytest.mark.parametrize("overrides,match", [
    (["mesh.fsdp=3"], r"mesh.data/fsdp/tensor/sequence: .*fixed axes do not divide the 8 devices"),
    (["mesh.fsdp=2", "mesh.data=2", "mesh.sequence=1"], r"mesh.data/fsdp/tensor/sequence: .* has 4 devices but 8"),
    (["train.micro_batch_size=2", "mesh.fsdp=4"], r"train.micro_batch_size: 2 is not divisible .*2 x 4 = 8"),
])
def test_mesh_problems_are_config_errors_naming_the_keys(overrides, match):
    with pytest.raises(ConfigError, match=match):
        check_mesh(load_config("tiny", overrides))


def test_process_count_that_the_job_does_not_have_is_named():
    cfg = load_config("tiny", ["mesh.num_processes=2", "mesh.coordinator_address=127.0.0.1:1"])
    with pytest.raises(ValueError, match=r"mesh.num_processes=2 but the job has 1 process.*127.0.0.1:1 reports 1"):
        sh.check_processes(cfg.mesh, process_count=1, process_index=0)
    with pytest.raises(ValueError, match=r"mesh.process_id=0 but the coordinator assigned process index 1"):
        sh.check_processes(cfg.mesh, process_count=2, process_index=1)
    sh.check_processes(load_config("tiny").mesh)  # this single process matches the tiny preset


def _random_params(setup, seed):
    shapes = nnx.to_pure_dict(setup.bundle.abstract_params)
    rng = np.random.default_rng(seed)
    pure = jax.tree.map(lambda a: jax.device_put(rng.normal(size=a.shape).astype(a.dtype), a.sharding), shapes)
    params = jax.tree.map(lambda x: x, setup.bundle.abstract_params)
    nnx.replace_by_pure_dict(params, pure)
    return params


def _equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
               zip(jax.tree.leaves(nnx.to_pure_dict(a)), jax.tree.leaves(nnx.to_pure_dict(b))))


def test_train_state_round_trips_whole_with_its_own_reference(setup, tmp_path):
    params, reference = _random_params(setup, 0), _random_params(setup, 1)
    opt_state = jax.jit(setup.optimizer.init, out_shardings=setup.opt_shardings)(params)
    state = state_lib.TrainState(3, params, opt_state, reference, {"grain": {"next_index": 3}},
                                 best=state_lib.Best(0.25, 2, 1), nan_streak=1)
    with Checkpointer(tmp_path, keep=2, async_save=True) as ckpt:
        state_lib.save(ckpt, state)
    with Checkpointer(tmp_path, keep=2, async_save=False) as ckpt:
        got, skipped = state_lib.restore(ckpt, setup)
    assert skipped == [] and got.step == 3 and got.data == state.data and got.nan_streak == 1
    assert got.best == state_lib.Best(0.25, 2, 1)
    assert _equal(got.params, params) and _equal(got.reference, reference) and not _equal(got.reference, params)
    assert jax.tree.leaves(got.reference)[0].sharding == jax.tree.leaves(setup.param_shardings)[0]


def test_checkpoint_without_the_reference_that_kl_needs_is_named(setup, tmp_path):
    params = _random_params(setup, 0)
    opt_state = jax.jit(setup.optimizer.init, out_shardings=setup.opt_shardings)(params)
    with Checkpointer(tmp_path, keep=2, async_save=False) as ckpt:
        state_lib.save(ckpt, state_lib.TrainState(1, params, opt_state, None, {}))
        with pytest.raises(CheckpointMismatchError, match=r"checkpoints?.*/1 holds no 'reference' item"):
            state_lib.restore(ckpt, setup)


def test_validation_reads_eval_split_without_hints_and_seeds_each_entry(setup, tmp_path):
    from environments.bfcl.splits import write_splits

    write_splits(str(tmp_path))
    cfg = load_config("tiny", [f"data.splits_dir={tmp_path}", "eval.split=test", "eval.max_entries=3",
                               "env.augment=True"])
    ids = hooks.validation_ids(cfg, setup.chat)
    test_ids = [json.loads(line)["metadata"]["bfcl_task"]["id"] for line in open(tmp_path / "bfcl_test.jsonl")]
    assert len(ids) == 3 and set(ids) <= set(test_ids)
    requests = hooks.validation_requests(cfg, ids, step=4)
    assert [r.entry_id for r in requests] == ids and not any(r.augment for r in requests)
    assert len({r.seed for r in requests}) == 3
    assert [r.seed for r in hooks.validation_requests(cfg, ids, step=4)] == [r.seed for r in requests]
    assert [r.seed for r in hooks.validation_requests(cfg, ids, step=8)] != [r.seed for r in requests]


def test_metrics_are_written_every_log_every_steps_and_at_the_end(tmp_path):
    cfg = load_config("tiny", [f"workdir={tmp_path}", "log.every_steps=2", "log.wandb_mode=disabled",
                               "train.num_steps=5"])
    hook = hooks.Metrics(cfg, resume_step=None)
    for step in range(1, 6):
        hook.after_step(hooks.StepEnd(step, None, {"reward/mean": float(step)}, last=step == 5))
    hook.after_step(hooks.StepEnd(6, None, {"val/accuracy/overall": 0.5}, last=False))
    hook.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 4, 5, 6]


def test_chain_keeps_command_line_overrides_and_follows_the_previous_workdir():
    overrides = ["train.lr=2e-6", "workdir=/data/runs/exp1/paper_stage1", "init_from=/models/qwen", "stage=x"]
    first = load_config("paper_stage1", overrides[:3])
    nxt = load_config(first.next_stage, chained_overrides(overrides, first, first.next_stage))
    assert nxt.stage == "paper_stage2" and nxt.train.lr == 2e-6
    assert nxt.init_from == "/data/runs/exp1/paper_stage1/hf_export"
    assert nxt.workdir == "/data/runs/exp1/paper_stage2"
    plain = load_config(first.next_stage, chained_overrides(["train.lr=2e-6"], load_config("paper_stage1"),
                                                             "paper_stage2"))
    assert plain.workdir == "runs/paper_stage2" and plain.init_from == "runs/paper_stage1/hf_export"


def test_prompts_are_measured_in_the_style_the_episodes_show(setup):
    """The prefill filter counts the prompt an episode shows (system prompt and the style's tool docs): the demo's
    two entries are 3,591 / 3,614 tokens in the t3rl style and 3,432 / 3,455 in bfcl's. (The split records' own
    T3RL-form tools, which it counted before, come to 2,156 / 2,179: it kept prompts the prefill cannot hold.)"""
    from t3rl_jax.run.loop import prompt_iterator

    small = ["rollout.max_prefill_length=3520"]
    bfcl = load_config("tiny", [*small, "prompt.style=bfcl", "eval.prompt_style=bfcl"])
    assert prompt_iterator(bfcl, setup.chat).get_state()["num_records"] == 2
    assert len(hooks.validation_ids(bfcl, setup.chat)) == 2
    with pytest.raises(ValueError, match="no records left .* max_prompt_tokens=3520"):
        prompt_iterator(load_config("tiny", small), setup.chat)
    with pytest.raises(ValueError, match="no records left .* max_prompt_tokens=3520"):
        hooks.validation_ids(load_config("tiny", [*small, "prompt.style=bfcl"]), setup.chat)
