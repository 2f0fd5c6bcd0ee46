"""Warm start: the SFT loss against numpy, and SFT on ground-truth trajectories through the real rollout path (env
pool workers, real tokenizer, a mesh of 8 fake CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t3rl_jax.rl.sft import sft_loss


def test_sft_loss_is_the_masked_token_mean_nll():
    rng = np.random.default_rng(0)
    logp = -rng.random((3, 7)).astype(np.float32)
    mask = (rng.random((3, 7)) < 0.4).astype(np.float32)
    expected = -(logp * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(sft_loss(jnp.asarray(logp), jnp.asarray(mask))), expected, rtol=1e-6)
    assert float(sft_loss(jnp.asarray(logp), jnp.zeros_like(jnp.asarray(mask)))) == 0.0


def test_loss_target_needs_a_whole_pass_at_or_below_it():
    from t3rl_jax.rl.sft import loss_target_reached

    assert not loss_target_reached([0.01], 0.0, 1)  # 0: off
    assert loss_target_reached([3.0, 0.05], 0.05, 1)
    assert not loss_target_reached([0.04], 0.05, 2)  # not a whole pass yet
    assert not loss_target_reached([3.0, 0.04, 0.07], 0.05, 2)  # the pass averages 0.055
    assert loss_target_reached([3.0, 0.04, 0.06], 0.05, 2)


def test_sft_rows_fit_the_longest_replay():
    from types import SimpleNamespace

    from t3rl_jax.rl.sft import sft_row_length

    replays = [SimpleNamespace(length=n) for n in (3_900, 4_034)]
    assert sft_row_length(replays, 4608) == 4096
    assert sft_row_length(replays, 4000) == 4000  # never past the training row
    assert sft_row_length([SimpleNamespace(length=4097)], 8192) == 4608


@pytest.mark.slow
def test_warm_start_fits_ground_truth_assistant_tokens():
    from environments.bfcl.pool import EnvPool
    from t3rl_jax import model_factory
    from t3rl_jax.config import load_config
    from t3rl_jax.rl.sft import warm_start, warm_start_entries
    from t3rl_jax.run.loop import make_engine
    from t3rl_jax.run.setup import build_setup

    # Tensor 2 x data 4 still fills the 8 devices with 4-row micro-batches, 3 of them padding, not 7 (36 s, not 61).
    cfg = load_config("tiny", {"model.hidden_size": 32, "model.intermediate_size": 64, "model.head_dim": 8,
                               "mesh.tensor": 2, "train.micro_batch_size": 4, "warm_start.steps": 8,
                               "warm_start.lr": 1e-2, "warm_start.max_entries": 1})
    assert jax.device_count() == 8
    trainer = build_setup(cfg)
    params = model_factory.init_params(cfg, trainer.bundle)
    before = [np.asarray(x).copy() for x in jax.tree.leaves(params)]
    engine = make_engine(trainer, params)
    assert warm_start_entries(cfg) == ["multi_turn_base_115"]
    with EnvPool(cfg.env.num_workers, step_timeout_s=cfg.env.step_timeout_s) as pool:
        new, metrics = warm_start(cfg, bundle=trainer.bundle, mesh=trainer.mesh,
                                  param_shardings=trainer.bundle.param_shardings,
                                  batch_sharding=trainer.batch_sharding, params=params, engine=engine, pool=pool,
                                  chat=trainer.chat)
    losses = [m["warm_start/loss"] for m in metrics]
    assert len(losses) == 8 and all(np.isfinite(losses))
    # A random model starts near log(vocab) ~ 11.9 nats per token; 8 steps at lr 1e-2 must cut that clearly.
    assert losses[0] > 10.0 and losses[-1] < losses[0] - 2.0, losses
    # Only assistant tokens count: a replay of 3 turns has a few hundred of them, not the ~2.2k prompt tokens.
    assert 50 < metrics[0]["warm_start/tokens"] < 1000
    # The caller's arrays are untouched; the engine samples from the new parameters.
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, jax.tree.leaves(params)))
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(before, jax.tree.leaves(new)))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(engine.params), jax.tree.leaves(new)))
