"""Episode rules (rollout/protocol.py) through the real driver, engine, tokenizer and a 2-worker env pool.

Replies are scripted (teacher-forced) where the test needs known replies; a tiny random model otherwise.
"""

import numpy as np
import pytest
from flax import nnx

from environments.bfcl.pool import EnvPool
from t3rl_jax.chat_format import ChatEncoder
from t3rl_jax.models.model_config import Qwen3Config
from t3rl_jax.models.qwen3 import Qwen3
from t3rl_jax.rollout.driver import EpisodeRequest, RolloutDriver, RolloutLimits
from t3rl_jax.rollout.engine import Qwen3Engine, SamplingSettings
from t3rl_jax.rollout.scripted import FINAL_TEXT, ground_truth_reply, named_call

STOCK = "multi_turn_base_105"  # turn 0's ground truth is one read-only call: get_stock_info(symbol='QUAS')


@pytest.fixture(scope="module")
def chat():
    from t3rl_jax.tokenizer import load_tokenizer

    return ChatEncoder(load_tokenizer())


@pytest.fixture(scope="module")
def engine():
    cfg = Qwen3Config(vocab_size=151936, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      intermediate_size=64)
    return Qwen3Engine(Qwen3(cfg, rngs=nnx.Rngs(0)), max_concurrent_decodes=2, max_prefill_length=4096,
                       max_cache_length=6144, sampling=SamplingSettings(temperature=0.0))


@pytest.fixture(scope="module")
def pool():
    with EnvPool(num_workers=2) as pool:
        yield pool


def _replies(traj, chat):
    """The assistant replies of a trajectory as text, in order (runs of loss-mask-1 tokens)."""
    ids, mask, _ = traj.arrays()
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return [chat.tokenizer.decode(ids[a:b].tolist()) for a, b in zip(edges[::2], edges[1::2])]


def _stock_call():
    return {"role": "assistant", "content": None, "tool_calls": [named_call("get_stock_info(symbol='QUAS')")]}


@pytest.mark.slow
def test_a_turn_takes_ten_tool_steps_then_the_answer(engine, pool, chat):
    # T3RL: tool-call and format-error replies count, the answer does not; more than 10 cut the turn off.
    def ten_then_answer(entry_id, turn, step):
        return _stock_call() if step < 10 else {"role": "assistant", "content": FINAL_TEXT}

    def eleven(entry_id, turn, step):
        return _stock_call() if turn == 0 else {"role": "assistant", "content": FINAL_TEXT}

    limits = RolloutLimits(max_steps_per_turn=10, max_model_calls=12, max_context_tokens=6144)
    answered = RolloutDriver(engine, pool, chat, limits=limits, script=ten_then_answer).run([EpisodeRequest(STOCK)])[0]
    replies = _replies(answered, chat)
    assert len(replies) >= 11 and all("get_stock_info" in r for r in replies[:10]) and FINAL_TEXT in replies[10]
    assert "cut_off_turns" not in answered.extras, answered.extras
    # Ten read-only calls leave the state as the ground truth's and contain its result: the turn is correct.
    assert answered.turn_correct[0] is True and answered.num_tool_calls >= 10

    cut = RolloutDriver(engine, pool, chat, limits=limits, script=eleven).run([EpisodeRequest(STOCK)])[0]
    assert cut.extras["cut_off_turns"] == [0] and cut.turn_correct[0] is False
    assert cut.num_model_calls == 12 and cut.termination == "completed"  # turn 1 (the last) answered at once
    # The 11th call still ran, and its result is shown before the next question (as in T3RL).
    ids, mask, _ = cut.arrays()
    last_reply_end = np.flatnonzero(mask)[-1]
    eleventh_end = [i for i in range(1, len(mask)) if mask[i - 1] == 1 and mask[i] == 0][10]
    between = chat.tokenizer.decode(ids[eleventh_end:last_reply_end].tolist())
    assert between.index("<tool_response>") < between.index("<|im_start|>user", between.index("</tool_response>"))
    assert cut.num_tool_calls == 11


@pytest.mark.slow
def test_the_token_budget_is_per_model_call_not_per_episode(engine, pool, chat):
    budget = 128
    limits = RolloutLimits(max_response_tokens=budget, max_context_tokens=6144)
    traj = RolloutDriver(engine, pool, chat, limits=limits, script=ground_truth_reply).run([EpisodeRequest(STOCK)])[0]
    assert traj.termination == "completed" and traj.reward == 1.0, (traj.termination, traj.extras)
    assert traj.length - traj.prompt_length > budget  # more than one call's budget after the prompt
    assert max(len(chat.tokenizer.encode(r)) for r in _replies(traj, chat)) <= budget
    assert traj.num_truncated_replies == 0


@pytest.mark.slow
def test_replies_cut_at_the_budget_are_closed_and_the_episode_goes_on(pool, chat):
    cfg = Qwen3Config(vocab_size=151936, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      intermediate_size=64)
    engine = Qwen3Engine(Qwen3(cfg, rngs=nnx.Rngs(1)), max_concurrent_decodes=2, max_prefill_length=4096,
                         max_cache_length=6144, sampling=SamplingSettings(temperature=1.0))
    limits = RolloutLimits(max_response_tokens=12, max_model_calls=3, max_context_tokens=6144, decode_steps_per_call=4)
    # Four turns: each truncated reply is a plain answer and ends its turn, so max_model_calls ends the episode.
    trajs = RolloutDriver(engine, pool, chat, limits=limits).run(
        [EpisodeRequest("multi_turn_base_146", seed=s, sample_index=s) for s in range(2)])
    for t in trajs:
        ids, mask, lp = t.arrays()
        # A random model rarely samples a stop token: every reply runs into the per-call budget ...
        assert t.num_truncated_replies == t.num_model_calls == 3 and t.termination == "max_model_calls"
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
        starts, ends = edges[::2], edges[1::2]
        assert (ends - starts).tolist() == [12, 12, 12]
        # ... and is closed by an unmasked <|im_end|> before the feedback or the next question.
        assert all(ids[e] == chat.tokenizer.im_end_id and mask[e] == 0 for e in ends[:-1])
        assert np.all(lp[mask == 1] <= 0) and np.all(lp[mask == 0] == 0)


@pytest.mark.slow
def test_calls_with_text_around_them_run_and_are_counted(engine, pool, chat):
    def chatty(entry_id, turn, step):
        reply = ground_truth_reply(entry_id, turn, step)
        if reply.get("tool_calls"):
            reply = dict(reply, content="<thinking>The ground truth says so.</thinking>\nI will look it up.")
        return reply

    limits = RolloutLimits(max_context_tokens=6144)
    driver = RolloutDriver(engine, pool, chat, limits=limits, script=chatty)
    traj = driver.run([EpisodeRequest(STOCK)])[0]
    assert traj.termination == "completed" and traj.reward == 1.0 and traj.num_format_errors == 0
    assert traj.num_replies_with_text == 2 == sum("I will look it up." in r for r in _replies(traj, chat))
    assert driver.metrics.summary()["rollout/replies_with_surrounding_text"] == pytest.approx(2 / traj.num_model_calls)


def test_unknown_prompt_style_is_refused_with_the_entry_and_the_styles():
    with pytest.raises(ValueError, match=r"multi_turn_base_1.*'chatml'.*\('t3rl', 'bfcl'\)"):
        EpisodeRequest("multi_turn_base_1", prompt_style="chatml")


@pytest.mark.parametrize("name, value", [("max_response_tokens", 0), ("max_steps_per_turn", 0), ("env_wait_s", 0.0)])
def test_bad_limits_name_the_field(name, value):
    with pytest.raises(ValueError, match=f"RolloutLimits.{name}"):
        RolloutLimits(**{name: value})


@pytest.mark.slow
def test_bfcl_style_keeps_tool_call_replies_in_bfcl_eval_history_form(engine, pool, chat):
    # bfcl-eval's Qwen handler stores a reply with calls as content "" + the calls re-serialised (json.dumps).
    def chatty(entry_id, turn, step):
        reply = ground_truth_reply(entry_id, turn, step)
        return dict(reply, content="I will look it up.") if reply.get("tool_calls") else reply

    limits = RolloutLimits(max_context_tokens=6144)
    bfcl, t3rl = (RolloutDriver(engine, pool, chat, limits=limits, script=chatty).run(
        [EpisodeRequest(STOCK, prompt_style=style)])[0] for style in ("bfcl", "t3rl"))
    for t in (bfcl, t3rl):
        assert t.termination == "completed" and t.reward == 1.0, (t.termination, t.extras)
    text = chat.tokenizer.decode(bfcl.token_ids)
    assert "I will look it up." not in text and bfcl.extras["rewritten_replies"] == 2
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_stock_info", "arguments": {"symbol": "QUAS"}}\n'
            '</tool_call><|im_end|>') in text
    # Only the answers stay sampled tokens; the t3rl style keeps every reply as sampled.
    assert _replies(bfcl, chat) == [FINAL_TEXT + "<|im_end|>"] * 2
    assert sum("I will look it up." in r for r in _replies(t3rl, chat)) == 2 and "rewritten_replies" not in t3rl.extras
