import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from t3rl_jax.rl.grpo import LossSettings, grpo_loss


def numpy_grpo_loss(s, logp, old, adv, mask, entropy, ref, rollout):
    r = np.exp(logp - old)
    pg = -np.minimum(r * adv, np.clip(r, 1 - s.clip_low, 1 + s.clip_high) * adv)
    if s.dual_clip:
        pg = np.where(adv < 0, np.minimum(pg, -adv * s.dual_clip), pg)
    if rollout is not None and s.tis_cap:
        pg = pg * np.minimum(np.exp(old - rollout), s.tis_cap)

    def agg(v):
        if s.loss_agg == "token_mean":
            return (v * mask).sum() / mask.sum()
        rows = mask.sum(1) > 0
        return ((v * mask).sum(1)[rows] / mask.sum(1)[rows]).mean()

    loss = agg(pg)
    if s.kl_coef:
        x = ref - logp
        loss += s.kl_coef * agg(np.exp(x) - x - 1)
    return loss - s.entropy_coef * agg(entropy)


def make_batch(seed, shape=(6, 24)):
    rng = np.random.default_rng(seed)
    old = rng.normal(-2, 1, shape)
    batch = {
        "old_logp": old,
        "logp": old + rng.normal(0, 0.4, shape),
        "advantages": np.repeat(rng.normal(size=(shape[0], 1)), shape[1], axis=1),
        "mask": (rng.uniform(size=shape) < 0.7).astype(np.float64),
        "entropy": rng.uniform(0, 3, shape),
        "ref_logp": old + rng.normal(0, 0.3, shape),
        "rollout_logp": old + rng.normal(0, 0.2, shape),
    }
    batch["mask"][2] = 0.0  # an all-padding row
    return batch


SETTINGS = [
    LossSettings(entropy_coef=0.001),
    LossSettings(dual_clip=3.0, kl_coef=0.1, entropy_coef=0.01, loss_agg="seq_mean_token_mean"),
    LossSettings(kl_coef=0.05, tis_cap=1.2),
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_grpo_loss_matches_numpy(settings):
    b = make_batch(0)
    f32 = {k: jnp.asarray(v, jnp.float32) for k, v in b.items()}
    if not settings.needs_reference:
        f32.pop("ref_logp")
    loss, metrics = jax.jit(grpo_loss, static_argnums=0)(settings, **f32)
    want = numpy_grpo_loss(
        settings, b["logp"], b["old_logp"], b["advantages"], b["mask"], b["entropy"], b["ref_logp"], b["rollout_logp"]
    )
    np.testing.assert_allclose(float(loss), want, rtol=1e-4)
    assert ("kl" in metrics) == settings.needs_reference
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert {"clip_frac_low", "clip_frac_high", "approx_kl", "entropy", "mismatch_ratio_max"} <= set(metrics)


@pytest.mark.parametrize("settings", SETTINGS)
def test_masked_tokens_change_neither_loss_nor_gradient(settings):
    b = make_batch(1)
    rng = np.random.default_rng(9)
    noisy = dict(b)
    for key in ("logp", "old_logp", "ref_logp", "rollout_logp", "entropy", "advantages"):
        noisy[key] = np.where(b["mask"] > 0, b[key], rng.normal(-5, 3, b[key].shape))

    def run(batch):
        arrays = {k: jnp.asarray(v, jnp.float32) for k, v in batch.items()}
        logp = arrays.pop("logp")
        return jax.value_and_grad(lambda lp: grpo_loss(settings, logp=lp, **arrays)[0])(logp)

    (l1, g1), (l2, g2) = run(b), run(noisy)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
    np.testing.assert_allclose(g1, g2, rtol=1e-6, atol=1e-9)
    assert np.all(np.asarray(g1)[b["mask"] == 0] == 0)


def test_all_masked_batch_gives_zero_loss_and_finite_gradient():
    b = make_batch(2)
    b["mask"][:] = 0.0
    arrays = {k: jnp.asarray(v, jnp.float32) for k, v in b.items()}
    settings = SETTINGS[1]
    logp = arrays.pop("logp")
    loss, grad = jax.value_and_grad(lambda lp: grpo_loss(settings, logp=lp, **arrays)[0])(logp)
    assert float(loss) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


def test_missing_inputs_are_named():
    x = jnp.zeros((1, 3))
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(LossSettings(kl_coef=0.1), logp=x, old_logp=x, advantages=x, mask=x)
    with pytest.raises(ValueError, match="entropy"):
        grpo_loss(LossSettings(entropy_coef=0.1), logp=x, old_logp=x, advantages=x, mask=x)
    with pytest.raises(ValueError, match="rollout_logp"):
        grpo_loss(LossSettings(tis_cap=2.0), logp=x, old_logp=x, advantages=x, mask=x)
    with pytest.raises(ValueError, match="loss_agg 'sum'"):
        LossSettings(loss_agg="sum")


def test_settings_from_algo_config():
    algo = ml_collections.ConfigDict(
        dict(advantage="grpo", clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.0, kl_type="low_var_kl",
             entropy_coef=0.001, loss_agg="token_mean", tis_cap=0.0, refill_groups=False, policy_loss="ppo_clip")
    )
    s = LossSettings.from_algo_config(algo)
    assert s == LossSettings(dual_clip=3.0, entropy_coef=0.001)
    assert not s.needs_reference
    hash(s)  # usable as a static jit argument
    # Dual clip off is 0 or None (slime applies none).
    assert LossSettings(dual_clip=None) == LossSettings(dual_clip=0.0)
    with pytest.raises(ValueError, match="policy_loss 'gspo'"):
        LossSettings(policy_loss="gspo")
