"""Rollout driver: multi-turn BFCL episodes through the real engine, chat deltas, a 2-worker env pool and scoring."""

import os
import signal

import numpy as np
import pytest
from flax import nnx

from environments.bfcl.pool import EnvPool
from t3rl_jax.chat_format import ChatEncoder
from t3rl_jax.models.model_config import Qwen3Config
from t3rl_jax.models.qwen3 import Qwen3
from t3rl_jax.rollout.driver import EpisodeRequest, RolloutDriver, RolloutLimits
from t3rl_jax.rollout.engine import Qwen3Engine, SamplingSettings
from environments.bfcl import catalog
from t3rl_jax.rollout.scripted import ground_truth_reply, wrong_argument_reply
from t3rl_jax.tokenizer import load_tokenizer

ENTRIES = ["multi_turn_base_105", "multi_turn_miss_func_146", "multi_turn_miss_param_105"]


@pytest.fixture(scope="module")
def chat():
    return ChatEncoder(load_tokenizer())


@pytest.fixture(scope="module")
def model():
    cfg = Qwen3Config(vocab_size=151936, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      intermediate_size=64)
    return Qwen3(cfg, rngs=nnx.Rngs(0))


def _engine(model, slots, sampling=SamplingSettings(temperature=0.0)):
    return Qwen3Engine(model, max_concurrent_decodes=slots, max_prefill_length=4096, max_cache_length=6144,
                       sampling=sampling)


@pytest.mark.slow
def test_ground_truth_replay_scores_full_progress_and_masks_exactly_the_replies(model, chat):
    limits = RolloutLimits(max_context_tokens=6144, max_response_tokens=4000)
    requests = [EpisodeRequest(e, group_id=i) for i, e in enumerate(ENTRIES)]
    engine = _engine(model, 2)
    with EnvPool(num_workers=2) as pool:
        trajs = RolloutDriver(engine, pool, chat, limits=limits, script=ground_truth_reply).run(requests)
        wrong = RolloutDriver(engine, pool, chat, limits=limits, script=wrong_argument_reply).run(requests)
    for entry_id, t in zip(ENTRIES, trajs):
        assert t.entry_id == entry_id and t.termination == "completed", t.extras
        assert t.reward == 1.0 and all(t.turn_correct) and len(t.turn_correct) == t.extras["num_entry_turns"]
        # Rebuild the expected replies from the script: the masked tokens are exactly their ids, in order.
        expected = []
        turn = step = 0
        while turn < t.num_turns:
            reply = ground_truth_reply(entry_id, turn, step)
            expected += chat.assistant_ids(reply)
            if reply.get("tool_calls"):
                step += 1
            else:
                turn, step = turn + 1, 0
        ids, mask, _ = t.arrays()
        assert ids[mask == 1].tolist() == expected
        assert t.prompt_length > 1000 and mask[:t.prompt_length].sum() == 0
        # The trajectory is the conversation as the template renders it: it decodes cleanly turn by turn.
        text = chat.tokenizer.decode(ids.tolist())
        assert text.count("<|im_start|>assistant") == t.num_model_calls
        assert text.endswith("<|im_end|>")
    # The warm start's noisy demonstrations (`warm_start.wrong_argument_replays`): the wrong calls run and the
    # episode completes, scored below the ground truth, and the two replays agree token for token up to a token the
    # model writes (the first wrong value), so no loss can tell them apart before it.
    for t, w in zip(trajs, wrong):
        assert w.termination == "completed" and w.reward < 1.0, (w.entry_id, w.extras)
        first = next(i for i, (a, b) in enumerate(zip(t.token_ids, w.token_ids)) if a != b)
        assert first > t.prompt_length and t.loss_mask[first] == w.loss_mask[first] == 1
    # miss_func: the held-back tools are shown when their turn comes (and not in the first prompt).
    missed = [name for names in catalog.load_entry(ENTRIES[1]).missed_function.values() for name in names]
    prompt = chat.tokenizer.decode(trajs[1].token_ids[:trajs[1].prompt_length])
    later = chat.tokenizer.decode(trajs[1].token_ids[trajs[1].prompt_length:])
    assert missed and all(f'"{name}"' not in prompt and f'"{name}"' in later for name in missed)


@pytest.mark.slow
def test_continuous_batching_equals_one_at_a_time_and_keeps_slots_busy(model, chat):
    limits = RolloutLimits(max_context_tokens=6144, max_response_tokens=24, max_model_calls=3,
                           decode_steps_per_call=4)  # 24 new tokens per reply
    sampling = SamplingSettings(temperature=1.0)
    requests = [EpisodeRequest(e, group_id=0, sample_index=i, seed=100 + i)
                for i, e in enumerate(["multi_turn_base_105", "multi_turn_base_105", "multi_turn_base_146"])]
    with EnvPool(num_workers=2) as pool:
        batched = RolloutDriver(_engine(model, 2, sampling), pool, chat, limits=limits)
        together = batched.run(requests)
        occupancy = batched.metrics.summary()["rollout/slot_occupancy"]
        # Alone on an engine of the same width: XLA:CPU may round a 1-row and a 2-row matmul differently, and at
        # temperature 1 one ulp can move a draw across a token boundary (seen: 90321 vs 90322); scheduling is what
        # this compares, not batch-width numerics.
        alone = [RolloutDriver(_engine(model, 2, sampling), pool, chat, limits=limits).run([r])[0] for r in requests]
    for a, b in zip(together, alone):
        assert a.token_ids == b.token_ids and a.loss_mask == b.loss_mask
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-4, atol=1e-5)
        assert a.termination in ("max_model_calls", "completed")
        assert a.num_model_calls > 1 and a.num_sampled <= 24 * a.num_model_calls
    # Same seed, same entry -> same sample; different seeds differ.
    assert together[0].token_ids != together[1].token_ids
    assert occupancy > 0.5
    # Sampled log-probs are finite and non-positive; observation tokens carry none.
    for t in together:
        ids, mask, lp = t.arrays()
        assert np.all(lp[mask == 1] <= 0) and np.all(lp[mask == 0] == 0)


@pytest.mark.slow
def test_an_env_failure_fails_only_the_episodes_of_that_worker_and_the_rest_complete(model, chat):
    entries = ["multi_turn_base_105", "multi_turn_base_146", "multi_turn_base_1", "multi_turn_base_3"]
    limits = RolloutLimits(max_context_tokens=6144)
    with EnvPool(num_workers=2) as pool:
        killed = []

        def script(entry_id, turn, step):
            if turn == 1 and not killed:  # the first episode to reach turn 1 takes worker 0 down with it
                killed.append(pool.worker_pids()[0])
                os.kill(killed[0], signal.SIGKILL)
            return ground_truth_reply(entry_id, turn, step)

        driver = RolloutDriver(_engine(model, 4), pool, chat, limits=limits, script=script)
        trajs = driver.run([EpisodeRequest(e, group_id=i) for i, e in enumerate(entries)])
    assert [t.entry_id for t in trajs] == entries
    failed = [t for t in trajs if t.termination == "env_failed"]
    assert 0 < len(failed) < len(trajs), [t.termination for t in trajs]
    for t in failed:
        assert "worker process exited" in t.extras["failure_reason"] and t.reward == 0.0
    for t in trajs:
        if t.termination != "env_failed":
            assert t.termination == "completed" and t.reward == 1.0, (t.entry_id, t.termination, t.extras)
    assert driver.metrics.summary()["rollout/env_failed"] == len(failed)
