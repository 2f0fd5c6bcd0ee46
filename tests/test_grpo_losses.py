import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t3rl_jax.rl.losses import KL_TYPES, kl_penalty, ppo_clip_loss, truncated_is_weights


def numpy_clip_loss(logp, old, adv, clip_low, clip_high, dual):
    """Element by element, written as the PPO objective reads."""
    out = np.zeros_like(logp, dtype=np.float64)
    for i in np.ndindex(logp.shape):
        r = np.exp(np.clip(logp[i] - old[i], -20, 20))
        a = adv[i]
        surrogate = min(r * a, np.clip(r, 1 - clip_low, 1 + clip_high) * a)
        if dual and a < 0:
            surrogate = max(surrogate, dual * a)
        out[i] = -surrogate
    return out


def random_batch(seed, shape=(4, 12), spread=0.6):
    rng = np.random.default_rng(seed)
    old = rng.normal(-2.0, 1.0, shape).astype(np.float32)
    logp = (old + rng.normal(0.0, spread, shape)).astype(np.float32)
    adv = rng.normal(size=shape).astype(np.float32)
    mask = (rng.uniform(size=shape) < 0.7).astype(np.float32)
    return logp, old, adv, mask


@pytest.mark.parametrize("dual", [0.0, 3.0])
def test_clip_loss_matches_numpy(dual):
    logp, old, adv, mask = random_batch(0, spread=1.0)
    loss, metrics = jax.jit(ppo_clip_loss, static_argnames=("clip_low", "clip_high", "dual_clip"))(
        logp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=dual
    )
    want = numpy_clip_loss(logp, old, adv, 0.2, 0.28, dual)
    np.testing.assert_allclose(np.asarray(loss), want, rtol=1e-5, atol=1e-6)

    r = np.exp(logp - old)
    m = mask.astype(bool)
    dual_hit = (adv < 0) & (r > dual) if dual else np.zeros_like(m)
    np.testing.assert_allclose(metrics["clip_frac_high"], np.mean(((adv > 0) & (r > 1.28))[m]), rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_frac_low"], np.mean(((adv < 0) & (r < 0.8))[m]), rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_frac_dual"], np.mean(dual_hit[m]), rtol=1e-6)
    np.testing.assert_allclose(metrics["approx_kl"], np.mean((old - logp)[m]), rtol=1e-5)
    np.testing.assert_allclose(metrics["ratio_max"], r[m].max(), rtol=1e-5)
    np.testing.assert_allclose(metrics["ratio_min"], r[m].min(), rtol=1e-5)
    np.testing.assert_allclose(metrics["ratio_mean"], r[m].mean(), rtol=1e-5)
    if dual:
        assert float(metrics["clip_frac_dual"]) > 0  # the random batch exercises the dual clip


def test_gradient_is_zero_exactly_where_the_clip_is_active():
    logp, old, adv, _ = random_batch(1, shape=(8, 64), spread=1.0)
    clip_low, clip_high, dual = 0.2, 0.28, 3.0

    def total(lp):
        loss, _ = ppo_clip_loss(lp, old, adv, jnp.ones_like(lp), clip_low=clip_low, clip_high=clip_high, dual_clip=dual)
        return jnp.sum(loss)

    grad = np.asarray(jax.grad(total)(logp))
    r = np.exp(logp - old)
    flat = ((adv > 0) & (r > 1 + clip_high)) | ((adv < 0) & (r < 1 - clip_low)) | ((adv < 0) & (r > dual))
    assert flat.sum() > 10 and (~flat).sum() > 10
    assert np.all(grad[flat] == 0.0)
    assert np.all(grad[~flat] != 0.0)
    # Where unclipped, d(-A r)/d logp = -A r.
    np.testing.assert_allclose(grad[~flat], (-adv * r)[~flat], rtol=1e-5)


def test_without_dual_clip_large_ratio_negative_advantage_keeps_gradient():
    logp = np.array([[0.0]], np.float32)
    old = np.array([[-2.0]], np.float32)  # ratio e^2 ~ 7.4
    adv = np.array([[-1.0]], np.float32)

    def f(lp, dual):
        return ppo_clip_loss(lp, old, adv, jnp.ones_like(lp), dual_clip=dual)[0].sum()

    assert float(jax.grad(f)(logp, 0.0)[0, 0]) > 0
    assert float(jax.grad(f)(logp, 3.0)[0, 0]) == 0.0


def test_truncated_is_weights_and_mismatch_metrics():
    rng = np.random.default_rng(3)
    old = rng.normal(-2, 1, (3, 20)).astype(np.float32)
    rollout = (old + rng.normal(0, 0.5, old.shape)).astype(np.float32)
    mask = (rng.uniform(size=old.shape) < 0.8).astype(np.float32)
    weights, metrics = truncated_is_weights(old, rollout, mask, cap=1.5)
    ratio = np.exp(old - rollout)
    m = mask.astype(bool)
    np.testing.assert_allclose(weights, np.minimum(ratio, 1.5), rtol=1e-5)
    np.testing.assert_allclose(metrics["mismatch_abs_logp_diff_mean"], np.abs(old - rollout)[m].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["mismatch_ratio_max"], ratio[m].max(), rtol=1e-5)
    np.testing.assert_allclose(metrics["tis_frac_capped"], (ratio > 1.5)[m].mean(), rtol=1e-6)

    off, off_metrics = truncated_is_weights(old, rollout, mask, cap=0.0)
    np.testing.assert_array_equal(off, 1.0)
    assert float(off_metrics["tis_frac_capped"]) == 0.0
    # Weights are constants: no gradient flows into either log-prob.
    g = jax.grad(lambda o: truncated_is_weights(o, rollout, mask, cap=1.5)[0].sum())(old)
    np.testing.assert_array_equal(g, 0.0)


def numpy_kl(logp, ref, kind):
    d = logp.astype(np.float64) - ref
    if kind == "low_var_kl":
        x = np.clip(-d, -20, 20)
        return np.clip(np.exp(x) - x - 1, -10, 10)
    return {"kl": d, "mse": 0.5 * d**2, "abs": np.abs(d)}[kind]


@pytest.mark.parametrize("kind", KL_TYPES)
def test_kl_estimators_match_numpy(kind):
    rng = np.random.default_rng(4)
    logp = rng.normal(-2, 1, (5, 9)).astype(np.float32)
    ref = (logp + rng.normal(0, 1.5, logp.shape)).astype(np.float32)
    ref[0, 0] = logp[0, 0] + 30.0  # beyond the clamp
    np.testing.assert_allclose(kl_penalty(logp, ref, kind), numpy_kl(logp, ref, kind), rtol=1e-5, atol=1e-6)


def test_low_var_kl_is_nonnegative_and_zero_at_equality():
    rng = np.random.default_rng(5)
    logp = rng.normal(-2, 1, (100,)).astype(np.float32)
    assert np.all(np.asarray(kl_penalty(logp, logp + rng.normal(0, 2, 100).astype(np.float32))) >= 0)
    np.testing.assert_array_equal(kl_penalty(logp, logp), 0.0)


def test_bad_settings_are_named():
    x = np.zeros((1, 2), np.float32)
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_clip_loss(x, x, x, x, dual_clip=0.5)
    with pytest.raises(ValueError, match="algo.kl_type 'k9'"):
        kl_penalty(x, x, "k9")
