import jax
import numpy as np
import pytest

from t3rl_jax.rl.advantages import group_advantages, group_advantages_flat


def numpy_advantages(rewards, mode, eps):
    out = np.zeros_like(rewards, dtype=np.float64)
    for g, r in enumerate(rewards):
        if len(r) < 2:
            continue
        centered = r - r.mean()
        out[g] = centered if mode == "mean_only" else centered / (np.std(r, ddof=1) + eps)
    return out


@pytest.mark.parametrize("mode", ["grpo", "mean_only"])
def test_group_advantages_match_numpy(mode):
    rng = np.random.default_rng(0)
    rewards = rng.uniform(size=(6, 5)).astype(np.float32)
    rewards[2] = 0.5  # a zero-variance group
    got = np.asarray(jax.jit(group_advantages, static_argnames=("mode", "eps"))(rewards, mode=mode, eps=1e-6))
    want = numpy_advantages(rewards.astype(np.float64), mode, 1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[2], 0.0)


def test_grpo_uses_unbiased_std():
    rewards = np.array([[0.0, 1.0]], np.float32)
    # unbiased std of {0, 1} is sqrt(0.5); biased would give +-1 exactly.
    got = np.asarray(group_advantages(rewards, eps=0.0))
    np.testing.assert_allclose(got, [[-np.sqrt(0.5), np.sqrt(0.5)]], rtol=1e-6)


@pytest.mark.parametrize("mode", ["grpo", "mean_only"])
def test_flat_advantages_match_numpy_with_uneven_groups(mode):
    rng = np.random.default_rng(1)
    group_ids = np.array([2, 0, 1, 0, 2, 2, 1, 0, 3, 2])  # group 3 is a singleton
    rewards = rng.uniform(size=group_ids.shape).astype(np.float32)
    got = np.asarray(group_advantages_flat(rewards, group_ids, 5, mode=mode))
    want = np.zeros_like(rewards, dtype=np.float64)
    for g in range(5):
        idx = np.flatnonzero(group_ids == g)
        if idx.size:
            want[idx] = numpy_advantages(rewards[idx][None].astype(np.float64), mode, 1e-6)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got[8] == 0.0


def test_flat_equals_grid_layout():
    rng = np.random.default_rng(2)
    rewards = rng.uniform(size=(4, 8)).astype(np.float32)
    grid = np.asarray(group_advantages(rewards))
    flat = np.asarray(group_advantages_flat(rewards.reshape(-1), np.repeat(np.arange(4), 8), 4))
    np.testing.assert_allclose(flat, grid.reshape(-1), rtol=1e-6, atol=1e-6)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="algo.advantage 'zscore'"):
        group_advantages(np.zeros((2, 2)), mode="zscore")
    with pytest.raises(ValueError, match="num_groups, group_size"):
        group_advantages(np.zeros(4))
