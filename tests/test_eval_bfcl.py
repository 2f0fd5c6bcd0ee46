"""BFCL evaluation script and model loading: splits, checkpoint kinds, scripted (100%) and greedy evaluation."""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from environments.bfcl import catalog, splits
from t3rl_jax import params_checkpoint
from t3rl_jax.checkpointing import CheckpointMismatchError, Checkpointer
from t3rl_jax.config import EXPORT_SUBDIR, load_config
from t3rl_jax.model_factory import model_config
from t3rl_jax.model_loading import load_model
from t3rl_jax.models import hf_io
from t3rl_jax.models.model_config import Qwen3Config
from t3rl_jax.models.qwen3 import Qwen3

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
SMALL = dict(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64)


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


eval_bfcl = _script("eval_bfcl")


def _params(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def _assert_same_weights(a, b):
    for x, y in zip(_params(a), _params(b), strict=True):
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------------------------- entry lists
def test_entry_ids_follow_t3rl_split_and_all_is_the_400_held_out():
    assert eval_bfcl.eval_entry_ids() == eval_bfcl.eval_entry_ids("all")  # the default is all 400
    test, val, held_out = (eval_bfcl.eval_entry_ids(s) for s in ("test", "val", "all"))
    assert len(test) == 300 and len(val) == 100 and len(held_out) == 400
    assert set(held_out) == set(test) | set(val) and not set(test) & set(val)
    assert not set(held_out) & set(splits.split_entry_ids("train"))
    quick = eval_bfcl.eval_entry_ids("all", ("miss_param", "base"), max_entries=3)
    # Per category, in the order asked, lowest numeric ids first.
    assert [catalog.parse_entry_id(i)[0] for i in quick] == ["miss_param"] * 3 + ["base"] * 3
    base = [i for i in held_out if i.startswith("multi_turn_base_")]
    assert quick[3:] == sorted(base, key=lambda i: catalog.parse_entry_id(i)[1])[:3]
    with pytest.raises(ValueError, match="unknown split 'train'"):
        eval_bfcl.eval_entry_ids("train")
    with pytest.raises(ValueError, match="unknown categories"):
        eval_bfcl.eval_entry_ids("test", ("base", "parallel"))
    with pytest.raises(ValueError, match="max_entries"):
        eval_bfcl.eval_entry_ids("test", max_entries=0)


# ---------------------------------------------------------------------------------------------- model loading
@pytest.fixture(scope="module")
def run_config():
    return load_config("tiny", {"model.vocab_size": 512, **{f"model.{k}": v for k, v in SMALL.items()}})


@pytest.fixture(scope="module")
def small_model(run_config):
    return Qwen3(model_config(run_config), rngs=nnx.Rngs(3))


def test_loads_params_checkpoint_and_hf_dir(tmp_path, small_model):
    cfg = small_model.config
    params_checkpoint.save_params(tmp_path / "ck", small_model, config=cfg)
    model, loaded_cfg = load_model(checkpoint=str(tmp_path / "ck"))
    assert loaded_cfg == cfg
    _assert_same_weights(model, small_model)
    hf_io.export_hf_dir(nnx.to_pure_dict(nnx.state(small_model, nnx.Param)), cfg, tmp_path / "hf", dtype="float32")
    model, loaded_cfg = load_model(hf_dir=str(tmp_path / "hf"))
    assert loaded_cfg.hidden_size == cfg.hidden_size and loaded_cfg.vocab_size == cfg.vocab_size
    _assert_same_weights(model, small_model)
    bf16, _ = load_model(checkpoint=str(tmp_path / "ck"), param_dtype="bfloat16")
    assert {x.dtype for x in _params(bf16)} == {np.dtype(jax.numpy.bfloat16)}


def test_loads_trainer_checkpoints_by_workdir_step_and_architecture_source(tmp_path, run_config, small_model):
    workdir = tmp_path / "run"
    pure = nnx.to_pure_dict(nnx.state(small_model, nnx.Param))
    later = jax.tree.map(lambda x: x + 1, pure)
    with Checkpointer(workdir / "checkpoints", keep=3, async_save=False) as ckpt:
        ckpt.save(2, params=pure, opt_state={"count": np.zeros((), np.int32)}, extra={})
        ckpt.save(4, params=later, opt_state={"count": np.ones((), np.int32)}, extra={})
    # Arrays only: the architecture must come from somewhere, and the error says how.
    with pytest.raises(FileNotFoundError, match="--config=NAME"):
        load_model(checkpoint=str(workdir))
    latest, _ = load_model(checkpoint=str(workdir), run_config=run_config)
    first, _ = load_model(checkpoint=str(workdir / "checkpoints"), run_config=run_config, step=2)
    _assert_same_weights(first, small_model)
    np.testing.assert_array_equal(_params(latest)[0], _params(small_model)[0] + 1)
    # The run's HF export names the architecture for every step below the workdir.
    os.makedirs(workdir / EXPORT_SUBDIR)
    with open(workdir / EXPORT_SUBDIR / "config.json", "w") as f:
        json.dump(small_model.config.to_hf_dict(), f)
    step_dir, cfg = load_model(checkpoint=str(workdir / "checkpoints" / "2"))
    assert cfg == small_model.config
    _assert_same_weights(step_dir, small_model)
    wider = load_config("tiny", {"model.vocab_size": 512, **{f"model.{k}": v for k, v in SMALL.items()},
                                 "model.intermediate_size": 96})
    with pytest.raises(CheckpointMismatchError, match="shape"):
        load_model(checkpoint=str(workdir), run_config=wider)


def test_load_model_rejects_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        load_model()
    with pytest.raises(ValueError, match="exactly one"):
        load_model(checkpoint="a", hf_dir="b")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(checkpoint=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(hf_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------------- evaluation
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random model with the real vocabulary (the real tokenizer's ids must all exist)."""
    cfg = Qwen3Config(vocab_size=151936, **SMALL)
    path = tmp_path_factory.mktemp("tiny") / "ck"
    params_checkpoint.save_params(path, Qwen3(cfg, rngs=nnx.Rngs(0)), config=cfg)
    return str(path)


def _run(tmp_path, tiny_checkpoint, *extra):
    out = tmp_path / "out"
    argv = ["--checkpoint", tiny_checkpoint, "--out", str(out), "--num_workers", "1", "--slots", "4", *extra]
    assert eval_bfcl.main(argv) == 0
    with open(out / "results.json") as f:
        results = json.load(f)
    with open(out / "results.md") as f:
        return results, f.read()


@pytest.mark.slow
def test_scripted_ground_truth_scores_100_percent_in_every_category(tmp_path, tiny_checkpoint, capsys):
    results, md = _run(tmp_path, tiny_checkpoint, "--scripted", "--max_entries", "1", "--split", "all")
    entries = results["entries"]
    assert [e["category"] for e in entries] == list(catalog.CATEGORIES)
    for e in entries:
        assert e["termination"] == "completed" and e["correct"] and e["progress"] == 1.0, e
        assert len(e["turn_correct"]) == e["num_turns"] > 1 and all(e["turn_correct"])
        assert e["num_tool_calls"] > 0 and e["num_tool_errors"] == 0
    scores = results["scores"]
    assert scores["accuracy/overall"] == 1.0
    assert all(scores[f"accuracy/{c}"] == 1.0 for c in catalog.CATEGORIES)
    assert "| **overall** (mean of categories) | 4 | **100.0** |" in md
    # bfcl-eval's own multi_turn_checker confirms every entry, on the calls rebuilt from the tokens.
    assert results["agreement"] == 1.0 and results["disagreements"] == []
    assert results["protocol"] == "bfcl" and results["limits"]["max_steps_per_turn"] == 20
    assert results["limits"]["max_context_tokens"] == 49152 and results["limits"]["max_response_tokens"] == 20000
    out = capsys.readouterr().out
    assert "**100.0**" in out and "multi_turn_checker agreement: 100.0% of 4 entries (0 disagree)" in out


@pytest.mark.slow
def test_greedy_eval_of_random_model_writes_the_table(tmp_path, tiny_checkpoint, capsys):
    results, md = _run(tmp_path, tiny_checkpoint, "--split", "test", "--categories", "base", "--max_entries", "2",
                       "--max_response_tokens", "48", "--max_steps_per_turn", "2", "--max_context_tokens", "8192")
    entries = results["entries"]
    assert [e["entry_id"] for e in entries] == eval_bfcl.eval_entry_ids("test", ("base",), 2)
    for e in entries:
        assert e["sampled_tokens"] > 0 and e["prompt_tokens"] > 1000
        assert e["termination"] in ("completed", "response_limit", "max_model_calls")
        assert e["correct"] == all(e["turn_correct"]) and 0.0 <= e["progress"] <= 1.0
    scores = results["scores"]
    assert scores["entries/base"] == 2 and scores["accuracy/overall"] == scores["accuracy/base"]
    assert results["sampling"]["temperature"] == 0.0 and results["limits"]["max_steps_per_turn"] == 2
    assert md.splitlines()[2] == "| category | entries | accuracy (%) | mean progress |"
    assert "| base | 2 |" in md and "tokens per entry" in md
    assert "| **overall** (mean of categories) | 2 |" in capsys.readouterr().out


def test_cli_defaults_are_the_bfcl_protocol_on_400_entries():
    args, _ = eval_bfcl.parse_args(["--scripted"])
    assert (args.split, args.protocol, args.temperature) == ("all", "bfcl", 0.0)
    limits = eval_bfcl.limits_from_args(args)
    from bfcl_eval.constants.default_prompts import MAXIMUM_STEP_LIMIT

    assert limits.max_steps_per_turn == MAXIMUM_STEP_LIMIT
    assert (limits.max_response_tokens, limits.max_context_tokens) == (20000, 49152)
    with pytest.raises(SystemExit):
        eval_bfcl.parse_args([])  # no model and not scripted


def _bad_call_script(entry_id, turn, step_in_turn):
    if step_in_turn == 0:
        return {"role": "assistant", "content": None, "tool_calls": [{"name": "no_such_tool", "arguments": {}}]}
    return {"role": "assistant", "content": "Done."}


@pytest.mark.slow
def test_evaluation_never_adds_hints_even_where_training_would(tiny_checkpoint):
    """The same failing call gets a hint in a training episode (augment on) and none in evaluate()."""
    from environments.bfcl.hints import HINT_PREFIX
    from environments.bfcl.pool import EnvPool
    from t3rl_jax.chat_format import ChatEncoder
    from t3rl_jax.eval import bfcl
    from t3rl_jax.rollout.driver import EpisodeRequest, RolloutDriver
    from t3rl_jax.rollout.engine import Qwen3Engine, SamplingSettings
    from t3rl_jax.tokenizer import load_tokenizer

    chat = ChatEncoder(load_tokenizer())
    model, _ = load_model(checkpoint=tiny_checkpoint)
    engine = Qwen3Engine(model, max_concurrent_decodes=2, max_prefill_length=4096, max_cache_length=8192)
    limits = bfcl.make_limits(max_steps_per_turn=3, max_model_calls=20, max_response_tokens=4096,
                              max_context_tokens=8192)
    entry = "multi_turn_base_115"
    with EnvPool(num_workers=1) as pool:
        training = RolloutDriver(engine, pool, chat, limits=limits, script=_bad_call_script).run(
            [EpisodeRequest(entry, augment=True)])[0]
        report = bfcl.evaluate(engine=engine, pool=pool, chat=chat, entry_ids=[entry], limits=limits,
                               sampling=SamplingSettings(temperature=0.0), prompt_style="t3rl", seed=0,
                               script=_bad_call_script, cross_check=True)
    text = lambda t: chat.tokenizer.decode(t.token_ids)  # noqa: E731
    assert HINT_PREFIX.strip() in text(training)
    evaluated = report.trajectories[0]
    assert evaluated.num_tool_calls == training.num_tool_calls > 0
    assert HINT_PREFIX.strip() not in text(evaluated)
    # Wrong calls fail every turn in both scorers.
    assert report.scores["accuracy/overall"] == 0.0 and report.agreement == 1.0


def test_calls_of_a_reply_rewritten_into_bfcl_history_form_reach_the_cross_check():
    """A `bfcl`-style reply that differs from bfcl-eval's history form is rewritten (observation tokens); its calls
    must still be read back for bfcl-eval's checker (they were lost before: 4 long_context disagreements of the
    400-entry scripted run)."""
    from t3rl_jax.chat_format import ChatEncoder
    from t3rl_jax.eval import bfcl
    from t3rl_jax.rollout.trajectory import Trajectory
    from t3rl_jax.tokenizer import load_tokenizer

    chat = ChatEncoder(load_tokenizer())
    entry = catalog.load_entry("multi_turn_base_115")
    t = Trajectory(entry_id=entry.id, group_id=0, sample_index=0)
    t.append_observation(chat.prompt_ids([{"role": "user", "content": "hi"}], []))
    t.prompt_length = t.length
    sampled = chat.assistant_ids({"role": "assistant", "content": "Let me look \u2019first.",
                                  "tool_calls": [{"name": "get_stock_info", "arguments": {"symbol": "AMZN"}}]})
    start = t.length
    t.append_sampled(sampled, [0.0] * len(sampled))
    wire = [{"name": "get_stock_info", "arguments": json.dumps({"symbol": "AMZN"})}]
    t.rewrite_tail(start, chat.assistant_ids({"role": "assistant", "content": "", "tool_calls": wire}))
    t.append_observation(chat.delta_ids([{"role": "tool", "content": '{"price": 1}'}]))
    answer = chat.assistant_ids({"role": "assistant", "content": "Done."})
    t.append_sampled(answer, [0.0] * len(answer))
    assert sum(t.loss_mask) == len(answer)  # the rewritten reply is an observation now
    assert bfcl.executed_turns(t, chat)[0] == [["get_stock_info(symbol='AMZN')"]]
