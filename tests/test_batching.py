import numpy as np
import pytest

from t3rl_jax.rl import batching
from t3rl_jax.rollout.trajectory import Trajectory


def _traj(rng, prompt, sampled_chunks, obs_chunks):
    t = Trajectory(entry_id="x", group_id=0, sample_index=0)
    t.append_observation(rng.integers(0, 100, prompt))
    for s, o in zip(sampled_chunks, obs_chunks):
        t.append_sampled(rng.integers(0, 100, s), rng.standard_normal(s))
        t.append_observation(rng.integers(0, 100, o))
    return t


def test_pack_round_trips_every_token_mask_and_logprob():
    rng = np.random.default_rng(0)
    trajs = [_traj(rng, int(rng.integers(3, 9)), [int(rng.integers(1, 6))] * 2, [int(rng.integers(0, 4))] * 2)
             for _ in range(9)]
    adv = rng.standard_normal(9)
    batch = batching.pack(trajs, adv, row_length=32, pad_rows_to_multiple=4)
    assert batch.tokens.shape[0] % 4 == 0
    for i, t in enumerate(trajs):
        ids, mask, logp = t.arrays()
        where = np.argwhere(batch.sequence_ids == i)
        r = where[0, 0]
        cols = where[:, 1]
        assert np.all(where[:, 0] == r) and np.all(np.diff(cols) == 1)
        np.testing.assert_array_equal(batch.tokens[r, cols], ids)
        np.testing.assert_array_equal(batch.positions[r, cols], np.arange(len(ids)))
        np.testing.assert_array_equal(batch.targets[r, cols[:-1]], ids[1:])
        np.testing.assert_array_equal(batch.loss_mask[r, cols[:-1]], mask[1:])
        np.testing.assert_allclose(batch.rollout_logprobs[r, cols[:-1]], logp[1:], rtol=1e-6)
        assert batch.loss_mask[r, cols[-1]] == 0
        assert np.all(batch.advantages[r, cols] == np.float32(adv[i]))
        assert len(np.unique(batch.segment_ids[r, cols])) == 1
    assert batch.loss_mask.sum() == sum(t.num_sampled - (t.loss_mask[0] == 1) for t in trajs)
    assert np.all(batch.loss_mask[batch.segment_ids == 0] == 0)


def test_pack_truncates_long_and_rejects_overflow():
    rng = np.random.default_rng(1)
    long = _traj(rng, 10, [30], [0])
    batch = batching.pack([long], [1.0], row_length=16)
    assert batch.num_truncated == 1 and batch.tokens.shape == (1, 16)
    with pytest.raises(ValueError, match="rows"):
        batching.pack([long, long], [1.0, 1.0], row_length=16, num_rows=1)
    with pytest.raises(ValueError, match="advantages"):
        batching.pack([long], [], row_length=16)


def test_long_trajectory_trains_on_its_first_part_with_the_whole_episode_advantage():
    rng = np.random.default_rng(2)
    long = _traj(rng, 6, [20, 15], [5, 0])  # 46 tokens, sampled tokens on both sides of the cut
    short = _traj(rng, 3, [4], [1])
    batch = batching.pack([long, short], [0.75, -0.5], row_length=24)
    assert batch.num_truncated == 1 and batch.tokens.shape == (2, 24)
    ids, mask, logp = long.arrays()
    r = int(np.argwhere(batch.sequence_ids == 0)[0, 0])
    assert np.all(batch.sequence_ids[r] == 0)  # the cut trajectory fills its row alone
    np.testing.assert_array_equal(batch.tokens[r], ids[:24])
    # Every position of the row predicts the next token of the episode, the last one the first token past the cut.
    np.testing.assert_array_equal(batch.targets[r], ids[1:25])
    np.testing.assert_array_equal(batch.loss_mask[r], mask[1:25])
    np.testing.assert_allclose(batch.rollout_logprobs[r], logp[1:25], rtol=1e-6)
    assert np.all(batch.advantages[r] == np.float32(0.75))
    assert batch.loss_mask[r].sum() == mask[1:25].sum() > 0


def test_first_fit_decreasing_respects_capacity():
    lengths = [7, 5, 4, 3, 3, 2, 1]
    bins = batching.first_fit_decreasing(lengths, 8)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 8 for b in bins)
    assert len(bins) == 4  # 25 tokens in bins of 8 need at least 4
