"""GRPO train step: exact chunked log-probs, micro-batch accumulation, NaN skipping, and learnability."""

import numpy as np
import jax
import jax.numpy as jnp
import ml_collections
import optax
import pytest
from flax import nnx

from t3rl_jax.models.model_config import Qwen3Config
from t3rl_jax.models.qwen3 import Qwen3
from t3rl_jax.rl import batching
from t3rl_jax.rl.advantages import group_advantages
from t3rl_jax.rl.grpo import LossSettings
from t3rl_jax.rl.train_step import (GRPOStep, StepSettings, loss_slots, make_optimizer, micro_batch,
                                   token_logprobs_and_entropy)
from t3rl_jax.rollout.engine import Qwen3Engine, SamplingSettings
from t3rl_jax.rollout.trajectory import Trajectory

CFG = Qwen3Config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  intermediate_size=64)


def _model(seed=0):
    return Qwen3(CFG, rngs=nnx.Rngs(seed))


def _batch(rng, rows=4, length=32):
    trajs = []
    for i in range(rows * 2):
        t = Trajectory(entry_id="x", group_id=i // 4, sample_index=i % 4)
        t.append_observation(rng.integers(0, 64, 5))
        t.append_sampled(rng.integers(0, 64, 6), -rng.random(6))
        t.append_observation(rng.integers(0, 64, 2))
        t.append_sampled(rng.integers(0, 64, 3), -rng.random(3))
        trajs.append(t)
    adv = rng.standard_normal(len(trajs)).astype(np.float32)
    return batching.pack(trajs, adv, row_length=length, num_rows=rows).as_dict()


def test_chunked_token_stats_equal_full_log_softmax():
    model = _model()
    rng = np.random.default_rng(0)
    b = _batch(rng, length=64)
    logp, ent = token_logprobs_and_entropy(model, b["tokens"], b["positions"], b["segment_ids"], b["targets"],
                                           temperature=0.7, seq_chunk=8, vocab_chunk=24)
    logits = np.asarray(model(b["tokens"], b["positions"], b["segment_ids"]), np.float64) / 0.7
    ls = logits - logits.max(-1, keepdims=True)
    ls = ls - np.log(np.exp(ls).sum(-1, keepdims=True))
    want_logp = np.take_along_axis(ls, b["targets"][..., None], -1)[..., 0]
    want_ent = -(np.exp(ls) * ls).sum(-1)
    np.testing.assert_allclose(np.asarray(logp), want_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), want_ent, rtol=1e-5, atol=1e-5)
    # Logits only at masked positions: equal there, zero elsewhere.
    most = int((b["loss_mask"] > 0).sum(1).max())
    assert loss_slots(b["loss_mask"], 1024) >= most and loss_slots(b["loss_mask"], 8) == 8
    slots = most  # the tightest valid choice
    assert slots < b["tokens"].shape[1]
    logp2, ent2 = token_logprobs_and_entropy(model, b["tokens"], b["positions"], b["segment_ids"], b["targets"],
                                             b["loss_mask"], temperature=0.7, seq_chunk=8, vocab_chunk=24,
                                             num_slots=slots)
    m = b["loss_mask"] > 0
    np.testing.assert_allclose(np.asarray(logp2)[m], want_logp[m], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent2)[m], want_ent[m], rtol=1e-5, atol=1e-5)
    # Per length shard (context parallelism's layout): each of 4 blocks of 16 keeps its own masked positions, 3 at
    # most here, in 3 slots; the row's other 52 positions get no logits (0).
    sparse = np.zeros_like(b["loss_mask"])
    sparse[0, [1, 5, 9, 17, 40, 41, 47, 63]] = 1.0
    sparse[1, [0, 20, 33, 34]] = 1.0
    assert loss_slots(sparse, 64, shards=4) == 16 and loss_slots(sparse, 64, shards=1) == 16
    assert loss_slots(np.ones((2, 256)), 256, shards=4) == 64 and loss_slots(sparse, 8, shards=4) == 2
    # Fixed data (the warm start): the exact need rounded to a multiple, not a power of two.
    assert loss_slots(np.ones((2, 300)), 300, multiple=32) == 300
    assert loss_slots(np.ones((1, 130)), 512, multiple=32) == 160
    assert loss_slots(sparse, 64, shards=4, multiple=2) == 4 and loss_slots(np.zeros((1, 64)), 64, multiple=32) == 32
    logp3, ent3 = token_logprobs_and_entropy(model, b["tokens"], b["positions"], b["segment_ids"], b["targets"],
                                             sparse, temperature=0.7, seq_chunk=8, vocab_chunk=24, num_slots=3,
                                             shards=4)
    m = sparse > 0
    np.testing.assert_allclose(np.asarray(logp3)[m], want_logp[m], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent3)[m], want_ent[m], rtol=1e-5, atol=1e-5)
    assert (np.asarray(ent3) != 0).sum(axis=1).max() == 4 * 3


def _train_cfg(**kw):
    base = dict(lr=1e-3, lr_schedule="constant", warmup_steps=0, b1=0.9, b2=0.999, adam_eps=1e-8,
                weight_decay=0.01, grad_clip=1.0, num_steps=10)
    base.update(kw)
    return ml_collections.ConfigDict(base)


def test_micro_batches_accumulate_to_the_full_batch_update():
    rng = np.random.default_rng(1)
    b = _batch(rng)
    settings = StepSettings(LossSettings(entropy_coef=0.01), seq_chunk=16, vocab_chunk=64)
    results = []
    for m in (1, 2, 4):
        model = _model()
        step = GRPOStep(model, optax.sgd(0.1), settings, donate=False)
        params = nnx.state(model, nnx.Param)
        new, _, metrics = step.update(params, step.optimizer.init(params), micro_batch(b, m))
        results.append((jax.tree.leaves(new), float(metrics["loss"])))
    for leaves, loss in results[1:]:
        np.testing.assert_allclose(loss, results[0][1], rtol=1e-5)
        for a, c in zip(leaves, results[0][0]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=2e-5, atol=1e-7)


def test_in_pass_anchor_equals_a_separate_old_logprob_pass():
    # old_logprobs None (trainer): each micro-batch's own forward is the PPO anchor; it must give the update and the
    # metrics that log-probs recomputed in a separate pass at the same parameters give.
    b = micro_batch(_batch(np.random.default_rng(3)), 1)
    settings = StepSettings(LossSettings(entropy_coef=0.01, dual_clip=3.0), old_logprobs="trainer", seq_chunk=16,
                            vocab_chunk=64)
    model = _model()
    step = GRPOStep(model, optax.sgd(0.1), settings, donate=False)
    params = nnx.state(model, nnx.Param)
    got = []
    for old in (None, step.logprobs(params, b)):
        new, _, metrics = step.update(params, step.optimizer.init(params), b, old_logprobs=old)
        got.append((jax.tree.leaves(new), metrics))
    (in_pass, m_in), (apart, m_apart) = got
    for a, c in zip(in_pass, apart):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=2e-5, atol=1e-7)
    for key in ("loss", "entropy", "approx_kl", "ratio_max", "ratio_min", "mismatch_abs_logp_diff_mean"):
        np.testing.assert_allclose(m_in[key], m_apart[key], rtol=2e-5, atol=1e-6, err_msg=key)
    assert m_in["ratio_max"] == m_in["ratio_min"] == 1.0
    assert m_in["num_loss_tokens"] == b["loss_mask"].sum()


def test_in_pass_and_given_anchors_share_one_compilation_on_a_mesh():
    # A step's first mini-batch anchors in-pass and the next on log-probs from `logprobs` (device arrays): on a mesh
    # the two calls must reuse one executable (a second compile costs seconds on the CPU demo, minutes for 4B).
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    b = micro_batch(_batch(np.random.default_rng(3)), 1)
    settings = StepSettings(LossSettings(entropy_coef=0.01), old_logprobs="trainer", seq_chunk=16, vocab_chunk=64)
    model = _model()
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
    params = nnx.state(model, nnx.Param)
    step = GRPOStep(model, optax.sgd(0.1), settings, donate=False,
                    param_shardings=jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), params),
                    batch_sharding=NamedSharding(mesh, PartitionSpec("data")))
    slots = step.slots_for(b)
    old = step.logprobs(params, b, num_slots=slots)
    compiles, counting = [], [True]
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _s, **_kw: compiles.append(event)
        if counting[0] and event == "/jax/core/compile/backend_compile_duration" else None)
    try:
        for anchor in (None, old):
            step.update_weighted(params, step.optimizer.init(params), b, old_logprobs=anchor, num_slots=slots)
            if anchor is None:
                first = len(compiles)
    finally:
        counting[0] = False
    assert first >= 1 and len(compiles) == first  # the given-anchor call compiled nothing new


def test_nonfinite_loss_skips_the_update():
    rng = np.random.default_rng(2)
    b = _batch(rng)
    b["advantages"][0, 3] = np.nan
    b["loss_mask"][0, 3] = 1.0
    model = _model()
    step = GRPOStep(model, make_optimizer(_train_cfg()), StepSettings(LossSettings()), donate=False)
    params = nnx.state(model, nnx.Param)
    opt = step.optimizer.init(params)
    new, new_opt, metrics = step.update(params, opt, micro_batch(b, 1))
    assert float(metrics["skipped_nonfinite"]) == 1.0
    for a, c in zip(jax.tree.leaves((new, new_opt)), jax.tree.leaves((params, opt))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.slow
def test_toy_reward_rises_within_a_few_dozen_steps():
    """Reward 1 for every sampled TARGET token: GRPO must push the policy towards it (sign and scale check)."""
    target, prompt, n_samples, new_tokens = 7, [1, 2, 3, 4, 5], 16, 8
    model = _model(3)
    engine = Qwen3Engine(model, max_concurrent_decodes=n_samples, max_prefill_length=16, max_cache_length=32,
                         sampling=SamplingSettings(temperature=1.0), stop_ids=(999,))
    settings = StepSettings(LossSettings(), seq_chunk=16, vocab_chunk=64, old_logprobs="rollout")
    step = GRPOStep(model, make_optimizer(_train_cfg(lr=1e-2)), settings)
    params = nnx.state(model, nnx.Param)
    opt = step.optimizer.init(params)
    history = []
    for it in range(30):
        state = engine.init_decode_state()
        trajs = []
        firsts = []
        for s in range(n_samples):
            state, tok, lp, _ = engine.extend_slot(params, state, s, prompt, reset=True, seed=it * 100 + s)
            firsts.append((int(tok), float(lp)))
        state, toks, lps, _, _ = engine.generate_steps(params, state, new_tokens - 1)
        toks, lps = np.asarray(toks), np.asarray(lps)
        rewards = []
        for s in range(n_samples):
            t = Trajectory(entry_id="toy", group_id=0, sample_index=s)
            t.append_observation(prompt)
            sampled = [firsts[s][0]] + toks[:, s].tolist()
            t.append_sampled(sampled, [firsts[s][1]] + lps[:, s].tolist())
            trajs.append(t)
            rewards.append(np.mean(np.asarray(sampled) == target))
        history.append(float(np.mean(rewards)))
        adv = np.asarray(group_advantages(jnp.asarray([rewards]))).ravel()
        b = batching.pack(trajs, adv, row_length=16, num_rows=n_samples).as_dict()
        params, opt, _ = step.update(params, opt, micro_batch(b, 2))
        engine.update_params(params)
    assert np.mean(history[:3]) < 0.1
    assert np.mean(history[-3:]) > 0.5, history
