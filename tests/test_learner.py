"""The learner's metrics are the whole step's, whatever the number of micro-batches or mini-batches.

Reference: `grpo_loss` on the whole batch at once (one array, no micro-batching), with the token log-probs and
entropies of the same model. KL is on (a reference model with other weights), the PPO anchor is the rollout's
log-probs (so ratios spread and both clip branches fire), and the last micro-batch at 4 micro-batches is pure
padding (a part with no token must not pull means, maxima or minima).
"""

import numpy as np
import optax
import pytest
from flax import nnx

from t3rl_jax.models.model_config import Qwen3Config
from t3rl_jax.models.qwen3 import Qwen3
from t3rl_jax.rl import batching
from t3rl_jax.rl.grpo import LossSettings, grpo_loss
from t3rl_jax.rl.learner import Learner
from t3rl_jax.rl.train_step import GRPOStep, StepSettings, micro_batch, token_logprobs_and_entropy
from t3rl_jax.rollout.trajectory import Trajectory

CFG = Qwen3Config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  intermediate_size=64)
CHECKED = ("loss", "pg_loss", "entropy", "kl", "clip_frac_low", "clip_frac_high", "clip_frac_dual", "approx_kl",
           "ratio_mean", "ratio_max", "ratio_min", "advantage_mean")


def _batch(rng, rows=8, length=32, episodes=12):
    trajs = []
    for i in range(episodes):
        t = Trajectory(entry_id="x", group_id=i // 4, sample_index=i % 4)
        t.append_observation(rng.integers(0, 64, 4))
        # Near the untrained model's log(1/64), so ratios to it spread on both sides of 1.
        t.append_sampled(rng.integers(0, 64, 3 + i % 5), np.log(1 / 64) + 0.4 * rng.standard_normal(3 + i % 5))
        t.append_observation(rng.integers(0, 64, 2))
        t.append_sampled(rng.integers(0, 64, 3), np.log(1 / 64) + 0.4 * rng.standard_normal(3))
        trajs.append(t)
    adv = rng.standard_normal(len(trajs)).astype(np.float32)
    b = batching.pack(trajs, adv, row_length=length, num_rows=rows).as_dict()
    assert b["segment_ids"][-2:].max() == 0, "the last two rows must be padding"
    return b


def _reference(model, ref_model, settings: StepSettings, b):
    def stats(m):
        return token_logprobs_and_entropy(m, b["tokens"], b["positions"], b["segment_ids"], b["targets"],
                                          temperature=settings.temperature, seq_chunk=settings.seq_chunk,
                                          vocab_chunk=settings.vocab_chunk)
    logp, ent = stats(model)
    ref_logp, _ = stats(ref_model)
    _, metrics = grpo_loss(settings.loss, logp=logp, old_logp=b["rollout_logprobs"], advantages=b["advantages"],
                           mask=b["loss_mask"], entropy=ent, ref_logp=ref_logp, segment_ids=b["segment_ids"])
    return {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean"])
def test_metrics_equal_the_whole_batch_at_1_2_4_micro_batches(loss_agg):
    b = _batch(np.random.default_rng(0))
    loss = LossSettings(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.1, entropy_coef=0.01,
                        loss_agg=loss_agg)
    settings = StepSettings(loss, old_logprobs="rollout", seq_chunk=16, vocab_chunk=64)
    model, ref_model = Qwen3(CFG, rngs=nnx.Rngs(0)), Qwen3(CFG, rngs=nnx.Rngs(1))
    want = _reference(model, ref_model, settings, b)
    assert want["kl"] > 0 and want["clip_frac_low"] > 0 and want["clip_frac_high"] > 0
    assert want["ratio_min"] < 1 < want["ratio_max"]
    ref_params = nnx.state(ref_model, nnx.Param)
    step = GRPOStep(model, optax.sgd(0.1), settings, donate=False)
    params = nnx.state(model, nnx.Param)
    for m in (1, 2, 4):
        _, _, got = Learner(step, settings).update(params, step.optimizer.init(params), ref_params,
                                                  [micro_batch(b, m)])
        for key in CHECKED:
            np.testing.assert_allclose(got[key], want[key], rtol=2e-5, atol=1e-7, err_msg=f"{key} at {m} micro")
        assert got["num_micro_batches"] == m
        assert got["num_loss_tokens"] == b["loss_mask"].sum()


def test_mini_batch_metrics_combine_by_their_reducers():
    # lr 0: the second mini-batch sees the same weights, so the two-step metrics must equal the one-step ones.
    b = _batch(np.random.default_rng(1))
    loss = LossSettings(kl_coef=0.1, entropy_coef=0.01, dual_clip=0.0)
    settings = StepSettings(loss, old_logprobs="trainer", seq_chunk=16, vocab_chunk=64)
    model, ref_model = Qwen3(CFG, rngs=nnx.Rngs(0)), Qwen3(CFG, rngs=nnx.Rngs(1))
    ref_params = nnx.state(ref_model, nnx.Param)
    step = GRPOStep(model, optax.sgd(0.0), settings, donate=False)
    params = nnx.state(model, nnx.Param)
    learner = Learner(step, settings)
    _, _, one = learner.update(params, step.optimizer.init(params), ref_params, [micro_batch(b, 2)])
    halves = [{k: v[:4] for k, v in b.items()}, {k: v[4:] for k, v in b.items()}]
    _, _, two = learner.update(params, step.optimizer.init(params), ref_params,
                               [micro_batch(h, 1) for h in halves])
    for key in ("loss", "entropy", "kl", "mismatch_abs_logp_diff_mean", "mismatch_ratio_max",
                "mismatch_ratio_min", "ratio_max", "ratio_min"):
        np.testing.assert_allclose(two[key], one[key], rtol=2e-5, atol=1e-7, err_msg=key)
    assert two["num_optimizer_steps"] == 2 and one["num_optimizer_steps"] == 1
    assert two["num_loss_tokens"] == one["num_loss_tokens"] == b["loss_mask"].sum()
    assert two["skipped_nonfinite"] == 0.0


def test_kl_without_reference_parameters_is_named():
    b = _batch(np.random.default_rng(2))
    settings = StepSettings(LossSettings(kl_coef=0.1))
    model = Qwen3(CFG, rngs=nnx.Rngs(0))
    step = GRPOStep(model, optax.sgd(0.1), settings, donate=False)
    params = nnx.state(model, nnx.Param)
    with pytest.raises(ValueError, match="kl_coef=0.1"):
        Learner(step, settings).update(params, step.optimizer.init(params), None, [micro_batch(b, 1)])
