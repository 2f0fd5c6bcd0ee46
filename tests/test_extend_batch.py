"""Host-side layout of a multi-slot prefill: sharing, padding, validation."""

import numpy as np
import pytest

from t3rl_jax.rollout.engine import SamplingSettings
from t3rl_jax.rollout.extend_batch import ExtendRequest, pack, prefill_bucket, prefill_cost

SAMPLING = SamplingSettings(temperature=0.7, top_p=1.0)


def _pack(requests):
    return pack(requests, num_slots=8, max_prefill=64, max_cache_length=100, sampling=SAMPLING)


def test_identical_fresh_prompts_share_one_computed_row_and_padding_rows_point_nowhere():
    prompt, other = [5, 6, 7], [9, 9]
    requests = [ExtendRequest(3, prompt, reset=True, seed=1), ExtendRequest(0, other, reset=False, limit=50),
                ExtendRequest(6, prompt, reset=True, seed=2, sampling=SamplingSettings(temperature=1.3)),
                ExtendRequest(1, other, reset=False)]  # same tokens, but continuing different histories
    b = _pack(requests)
    assert b.tokens.shape == (4, prefill_bucket(3, 64))  # 3 computed rows padded to 4
    np.testing.assert_array_equal(b.base_slots, [3, 0, 1, 8])
    np.testing.assert_array_equal(b.true_lengths, [3, 2, 2, 0])
    np.testing.assert_array_equal(b.resets, [True, False, False, True])
    np.testing.assert_array_equal(b.tokens[0, :4], [5, 6, 7, 0])
    np.testing.assert_array_equal(b.slots, [3, 0, 6, 1])
    np.testing.assert_array_equal(b.sources, [0, 1, 0, 2])
    np.testing.assert_array_equal(b.seeds, [1, 0, 2, 0])
    np.testing.assert_allclose(b.temperature, [0.7, 0.7, 1.3, 0.7])
    np.testing.assert_array_equal(b.limits, [100, 50, 100, 100])
    assert b.longest == 3
    assert prefill_cost(requests, 64) == 4 * prefill_bucket(3, 64)


def test_bad_requests_name_themselves():
    with pytest.raises(ValueError, match="at least one request"):
        _pack([])
    with pytest.raises(ValueError, match="twice"):
        _pack([ExtendRequest(1, [1]), ExtendRequest(1, [2])])
    with pytest.raises(ValueError, match="slot 8 outside"):
        _pack([ExtendRequest(8, [1])])
    with pytest.raises(ValueError, match="slot 2"):
        _pack([ExtendRequest(2, [])])
    with pytest.raises(ValueError, match="top_k"):
        _pack([ExtendRequest(2, [1], sampling=SamplingSettings(top_k=5))])
    with pytest.raises(ValueError, match="max_prefill_length 64"):
        _pack([ExtendRequest(2, list(range(65)))])
