"""The presets carry their anchors' numbers: T3RL's script for stage1/stage2, EnvTuning's for the paper stages, and
contexts that hold every ground-truth replay of the evaluation split."""

import pytest

from environments.bfcl import catalog
from t3rl_jax.chat_format import ChatEncoder
from t3rl_jax.config import load_config
from t3rl_jax.eval import bfcl as bfcl_eval
from t3rl_jax.tokenizer import load_tokenizer

T3RL_PRESETS = ("stage1", "stage2")
PAPER_PRESETS = tuple(f"paper_stage{n}" for n in range(1, 5))
REAL_PRESETS = T3RL_PRESETS + PAPER_PRESETS


@pytest.mark.parametrize("name", T3RL_PRESETS)
def test_t3rl_presets_follow_t3rl_script(name):
    c = load_config(name)
    # run_bfcl_qwen3_4b.sh: --num-rollout 800, --rollout-batch-size 32, --n-samples-per-prompt 16,
    # --rollout-max-response-len 10000, --eval-interval 5, --eval-max-response-len 20000, --save-interval 20
    assert (c.data.prompts_per_step, c.rollout.samples_per_prompt, c.rollout.temperature) == (32, 16, 1.0)
    assert c.rollout.max_response_tokens == 10000 and c.eval.max_response_tokens == 20000
    assert (c.eval.every_steps, c.eval.split, c.eval.keep_best, c.checkpoint.every_steps) == (5, "val", True, 20)
    # T3RL code: 10 tool steps per turn (plus the answer), 30 model calls; no hints; its own prompt style.
    assert (c.rollout.max_steps_per_turn, c.rollout.max_model_calls) == (10, 30)
    assert c.env.augment is False and c.prompt.style == "t3rl"
    # slime: per-sequence token mean then mean over sequences, no dual clip; dynamic sampling refills.
    a = c.algo
    assert (a.loss_agg, a.dual_clip, a.filter_zero_variance, a.refill_groups) == ("seq_mean_token_mean", 0.0, True,
                                                                                   True)
    assert (a.clip_low, a.clip_high, a.entropy_coef, a.kl_coef) == (0.2, 0.28, 0.001, 0.0)
    t = c.train
    assert (t.lr, t.lr_schedule, t.b1, t.b2, t.weight_decay, t.grad_clip) == (1e-6, "constant", 0.9, 0.999, 0.01, 1.0)
    assert t.mini_batches_per_step == 1  # --global-batch-size 512 = 32 x 16: one optimizer step per rollout
    assert c.warm_start.steps == 0
    if name == "stage1":
        assert t.num_steps == 800 and c.data.train_file == "bfcl_train_base.jsonl"


def test_paper_stages_follow_envtuning_and_stage4_keeps_stage3_budgets():
    s = {n: load_config(f"paper_stage{n}") for n in range(1, 5)}
    assert [s[n].env.augment for n in range(1, 5)] == [False, True, True, False]
    assert [s[n].env.reward for n in range(1, 5)] == ["format", "progress", "progress", "progress"]
    for c in s.values():
        assert (c.algo.kl_coef, c.algo.kl_type, c.algo.dual_clip) == (0.1, "low_var_kl", 10.0)
        assert c.rollout.max_response_tokens == 10000 and c.rollout.max_steps_per_turn == 5
    budget = lambda c: (c.rollout.max_response_tokens, c.rollout.max_context_tokens, c.train.max_seq_len,  # noqa
                        c.mesh.sequence, c.data.train_file)
    assert budget(s[4]) == budget(s[3])
    assert s[3].train.max_seq_len == 8192 + 24576 and s[1].train.max_seq_len == s[2].train.max_seq_len < 8192 + 24576


@pytest.mark.parametrize("name", REAL_PRESETS)
def test_validation_never_adds_hints(name):
    c = load_config(name)
    requests = bfcl_eval.eval_requests(["multi_turn_base_1", "multi_turn_miss_func_4"], seed=c.seed,
                                       prompt_style=c.eval.prompt_style)
    assert [r.augment for r in requests] == [False, False]
    limits = bfcl_eval.validation_limits(c)
    assert limits.max_response_tokens == c.eval.max_response_tokens
    assert limits.max_context_tokens == c.rollout.max_context_tokens


@pytest.fixture(scope="module")
def chat():
    return ChatEncoder(load_tokenizer())


@pytest.mark.slow
@pytest.mark.parametrize("name", REAL_PRESETS)
def test_ground_truth_of_every_held_out_entry_fits_the_context(name, chat):
    """Validation and the eval script run on the presets' context: a perfect replay of each of the 400 held-out
    entries must fit it (today's 18,432 cut 17 long_context ground truths short)."""
    c = load_config(name)
    ids = bfcl_eval.held_out_entry_ids("all")
    assert len(ids) == 400
    excluded = bfcl_eval.check_budget(ids, chat, bfcl_eval.validation_limits(c))
    assert excluded == {}
    eval_excluded = bfcl_eval.check_budget(ids, chat, bfcl_eval.protocol_limits("bfcl"))
    assert eval_excluded == {}


def test_ground_truth_token_count_is_the_driver_trajectory_length(chat):
    """check_budget's count is the scripted trajectory's length (driver + env pool + real tokenizer)."""
    from flax import nnx

    from environments.bfcl.pool import EnvPool
    from t3rl_jax.models.model_config import Qwen3Config
    from t3rl_jax.models.qwen3 import Qwen3
    from t3rl_jax.rollout.driver import EpisodeRequest, RolloutDriver, RolloutLimits
    from t3rl_jax.rollout.engine import Qwen3Engine
    from t3rl_jax.rollout.scripted import ground_truth_reply

    ids = ["multi_turn_base_115", "multi_turn_miss_func_101"]
    cfg = Qwen3Config(vocab_size=151936, num_layers=1, hidden_size=16, num_heads=2, num_kv_heads=1, head_dim=8,
                      intermediate_size=32)
    engine = Qwen3Engine(Qwen3(cfg, rngs=nnx.Rngs(0)), max_concurrent_decodes=2, max_prefill_length=4096,
                         max_cache_length=8192)
    with EnvPool(num_workers=1) as pool:
        driver = RolloutDriver(engine, pool, chat, limits=RolloutLimits(max_context_tokens=8192),
                               script=ground_truth_reply)
        trajectories = driver.run([EpisodeRequest(e, group_id=i) for i, e in enumerate(ids)])
    for entry_id, t in zip(ids, trajectories):
        assert t.termination == "completed" and t.extras["progress"] == 1.0
        assert bfcl_eval.ground_truth_tokens(entry_id, chat) == (t.prompt_length, t.length)


def test_budget_that_cannot_hold_a_prompt_names_key_entry_and_numbers(chat):
    limits = bfcl_eval.protocol_limits("bfcl", max_context_tokens=2048)
    with pytest.raises(ValueError, match=r"--max_context_tokens=2048 cannot hold the prompt of "
                                         r"multi_turn_base_0 \(\d+ tokens"):
        bfcl_eval.check_budget(["multi_turn_base_0"], chat, limits, key="--max_context_tokens")
    # A long_context entry whose ground truth does not fit is reported with its numbers (it still runs).
    excluded = bfcl_eval.check_budget(["multi_turn_long_context_117"], chat,
                                      bfcl_eval.protocol_limits("bfcl", max_context_tokens=18432))
    assert list(excluded) == ["multi_turn_long_context_117"]
    _, total = bfcl_eval.ground_truth_tokens("multi_turn_long_context_117", chat)
    assert total > 18432
    assert excluded["multi_turn_long_context_117"] == (f"ground-truth replay needs {total} tokens > "
                                                       "max_context_tokens=18432")


def test_unknown_entry_is_named_with_its_source():
    with pytest.raises(ValueError, match=r"split file x.jsonl: entry 2 names unknown BFCL entry "
                                         r"'multi_turn_base_999'"):
        bfcl_eval.check_entries_exist(["multi_turn_base_1", "multi_turn_base_999"], source="split file x.jsonl")
    assert catalog.load_entry("multi_turn_base_1")  # the known one is real
