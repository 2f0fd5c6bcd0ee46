import numpy as np
import pytest

from t3rl_jax.rl.group_filter import filter_zero_variance, has_reward_variance, top_up_groups


def test_filter_keeps_groups_with_distinct_rewards():
    rewards = np.array([[1, 1, 1], [0, 1, 0], [0.25, 0.25, 0.25], [0, 0, 0.5], [0, 0, 0]], np.float32)
    result = filter_zero_variance(rewards)
    np.testing.assert_array_equal(result.kept_indices, [1, 3])
    assert (result.num_kept, result.num_dropped) == (2, 3)


def test_random_filter_matches_numpy_unique():
    rng = np.random.default_rng(0)
    rewards = rng.integers(0, 2, size=(50, 4)).astype(np.float32)
    want = [g for g in range(50) if len(np.unique(rewards[g])) > 1]
    np.testing.assert_array_equal(filter_zero_variance(rewards).kept_indices, want)


def test_tolerance_and_bad_rewards():
    rewards = np.array([[0.5, 0.5 + 1e-9], [0.0, 1.0]])
    np.testing.assert_array_equal(has_reward_variance(rewards, atol=1e-6), [False, True])
    with pytest.raises(ValueError, match="non-finite reward nan in group 1"):
        has_reward_variance(np.array([[0.0, 1.0], [np.nan, 1.0]]))
    with pytest.raises(ValueError, match="num_groups, group_size"):
        has_reward_variance(np.zeros(3))


def test_top_up_draws_lazily_and_rejects_flat_groups():
    kept = [("a", [0, 1])]
    drawn = []

    def queue():
        for name, r in [("b", [1, 1]), ("c", [0, 1]), ("d", [1, 0]), ("e", [0, 1])]:
            drawn.append(name)
            yield name, r

    result = top_up_groups(kept, queue(), target=3, rewards_of=lambda g: g[1])
    assert [g[0] for g in result.groups] == ["a", "c", "d"]
    assert (result.num_drawn, result.num_rejected) == (3, 1)
    assert drawn == ["b", "c", "d"]  # "e" was never requested


def test_top_up_returns_short_when_queue_runs_dry():
    result = top_up_groups([], iter([[1, 1], [0, 1]]), target=5, rewards_of=lambda r: r)
    assert result.groups == [[0, 1]] and result.num_drawn == 2 and result.num_rejected == 1
    assert top_up_groups([[0, 1]] * 4, iter([]), target=2, rewards_of=lambda r: r).groups == [[0, 1]] * 2
