"""The registry: every name resolves to a function that computes what its kind promises; config choices are its names."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from t3rl_jax.config import ConfigError, load_config
from t3rl_jax.config_checks import CHOICES
from t3rl_jax.rl import registry
from t3rl_jax.rl.aggregation import aggregate
from t3rl_jax.rl.grpo import LossSettings, grpo_loss


def test_config_choices_are_the_registered_names():
    for kind, key in registry.CONFIG_KEYS.items():
        assert CHOICES[key] == registry.names(kind) and registry.names(kind)
    with pytest.raises(ConfigError, match="algo.loss_agg"):
        load_config("tiny", ["algo.loss_agg=sum"])
    with pytest.raises(ConfigError, match="algo.policy_loss"):
        load_config("tiny", ["algo.policy_loss=gspo"])


def test_loading_a_config_imports_no_jax():
    code = "import sys; from t3rl_jax.config import load_config; load_config('tiny'); print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_registered_name_resolves():
    for kind in registry.KINDS:
        for name in registry.names(kind):
            assert callable(registry.get(kind, name))
    with pytest.raises(ValueError, match=r"algo.kl_type 'k9' is not registered; expected one of \('low_var_kl'"):
        registry.get("kl", "k9")
    with pytest.raises(KeyError, match="unknown registry kind 'critic'"):
        registry.names("critic")


def test_registered_advantages_and_aggregations_match_numpy():
    r = np.array([[0.0, 1.0, 1.0, 0.5]], np.float32)
    centered = r - r.mean(1, keepdims=True)
    std = r.std(1, ddof=1, keepdims=True)
    np.testing.assert_allclose(registry.get("advantage", "grpo")(centered, std, 1e-6), centered / (std + 1e-6),
                               rtol=1e-6)
    np.testing.assert_allclose(registry.get("advantage", "mean_only")(centered, std, 1e-6), centered)
    values = np.array([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]], np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], np.float32)
    np.testing.assert_allclose(aggregate(jnp.asarray(values), jnp.asarray(mask), "token_mean"), 10 / 4)
    np.testing.assert_allclose(aggregate(jnp.asarray(values), jnp.asarray(mask), "seq_mean_token_mean"),
                               (2.0 + 4.0) / 2)


@pytest.mark.parametrize("loss_agg", registry.names("loss_agg"))
def test_slime_and_envtuning_loss_settings_compute(loss_agg):
    # slime: per-sequence token mean, no dual clip; EnvTuning: token mean, dual clip 10.
    rng = np.random.default_rng(0)
    shape = (3, 8)
    logp = jnp.asarray(-rng.random(shape), jnp.float32)
    old = jnp.asarray(-rng.random(shape), jnp.float32)
    adv = jnp.asarray(rng.standard_normal((3, 1)), jnp.float32)
    mask = jnp.asarray(rng.random(shape) > 0.3, jnp.float32)
    for dual in (None, 0.0, 10.0):
        settings = LossSettings(dual_clip=dual, loss_agg=loss_agg)
        loss, metrics = grpo_loss(settings, logp=logp, old_logp=old, advantages=adv, mask=mask)
        assert np.isfinite(float(loss))
        assert (float(metrics["clip_frac_dual"]) >= 0) and (dual or float(metrics["clip_frac_dual"]) == 0)
