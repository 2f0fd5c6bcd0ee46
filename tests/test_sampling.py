import numpy as np
import pytest
import jax
import jax.numpy as jnp
from scipy import stats

from t3rl_jax.rollout import sampling


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_temperature_sampling_matches_softmax_chi_square():
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], np.float32)
    temperature = 0.7
    n = 20000
    batch = jnp.tile(jnp.asarray(logits)[None], (n, 1))
    tokens, _ = jax.jit(lambda k, l: sampling.sample(k, l, temperature=temperature))(jax.random.key(0), batch)
    counts = np.bincount(np.asarray(tokens), minlength=len(logits))
    expected = _softmax(logits.astype(np.float64) / temperature) * n
    _, p = stats.chisquare(counts, expected)
    assert p > 1e-3, (counts, expected)


def test_logprobs_are_full_log_softmax_at_sampled_token():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((16, 50)).astype(np.float32) * 3
    tokens, logprobs = sampling.sample(jax.random.key(1), jnp.asarray(logits), temperature=1.3, top_k=5,
                                       top_p=0.8, use_top_p=True)
    ref = jax.nn.log_softmax(jnp.asarray(logits) / 1.3, axis=-1)
    np.testing.assert_allclose(np.asarray(logprobs), np.asarray(ref)[np.arange(16), np.asarray(tokens)], rtol=1e-6)


def test_greedy_rows_take_argmax_and_mixed_rows_sample():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.standard_normal((8, 30)).astype(np.float32))
    temps = jnp.asarray([0.0, 1.0] * 4)
    tokens, logprobs = sampling.sample(jax.random.key(3), logits, temperature=temps)
    argmax = np.asarray(jnp.argmax(logits, -1))
    assert np.all(np.asarray(tokens)[::2] == argmax[::2])
    np.testing.assert_allclose(np.asarray(logprobs)[::2],
                               np.asarray(jax.nn.log_softmax(logits, -1))[np.arange(0, 8, 2), argmax[::2]], rtol=1e-6)


def test_top_k_keeps_exactly_k_largest():
    logits = jnp.asarray([[0.1, 5.0, 3.0, -1.0, 4.0]])
    masked = np.asarray(sampling.top_k_mask(logits, 2))
    assert np.isfinite(masked).tolist() == [[False, True, False, False, True]]
    tokens, _ = sampling.sample(jax.random.key(0), jnp.tile(logits, (2000, 1)), temperature=1.0, top_k=2)
    assert set(np.unique(np.asarray(tokens))) == {1, 4}


def test_top_p_keeps_smallest_prefix_reaching_mass():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.asarray(np.log(probs)[None].astype(np.float32))
    kept = lambda p: np.isfinite(np.asarray(sampling.top_p_mask(logits, p)))[0].tolist()
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.81) == [True, True, True, False]
    assert kept(1.0) == [True, True, True, True]
    assert kept(0.0) == [True, False, False, False]  # never empty
    tokens, _ = sampling.sample(jax.random.key(0), jnp.tile(logits, (4000, 1)), temperature=1.0, top_p=0.6,
                                use_top_p=True)
    counts = np.bincount(np.asarray(tokens), minlength=4)
    assert counts[2] == counts[3] == 0
    _, p = stats.chisquare(counts[:2], np.array([0.5, 0.3]) / 0.8 * counts[:2].sum())
    assert p > 1e-3


@pytest.mark.parametrize("block", [sampling.CDF_BLOCK, 2, 4])  # one level, and blocks split by the masks
def test_inverse_cdf_draw_never_picks_masked_tokens_and_matches_frequencies(block):
    logits = np.array([-np.inf, 0.0, -np.inf, 1.0, 0.5, -np.inf, -np.inf], np.float32)
    n = 20000
    u = jax.random.uniform(jax.random.key(4), (n,))
    draw = jax.jit(lambda u, x: sampling.inverse_cdf_draw(u, x, block=block))
    tokens = np.asarray(draw(u, jnp.tile(jnp.asarray(logits)[None], (n, 1))))
    counts = np.bincount(tokens, minlength=len(logits))
    assert counts[[0, 2, 5, 6]].sum() == 0
    probs = _softmax(logits[[1, 3, 4]].astype(np.float64))
    _, p = stats.chisquare(counts[[1, 3, 4]], probs * n)
    assert p > 1e-3
    # Extreme uniforms stay inside the support.
    edge = np.asarray(draw(jnp.asarray([0.0, 1.0 - 1e-7]), jnp.tile(jnp.asarray(logits)[None], (2, 1))))
    assert edge.tolist() == [1, 4]


def test_two_level_draw_matches_frequencies_over_many_blocks():
    rng = np.random.default_rng(9)
    logits = rng.normal(0, 1.5, 50).astype(np.float32)
    logits[rng.random(50) < 0.3] = -np.inf
    n = 40000
    u = jax.random.uniform(jax.random.key(5), (n,))
    tokens = np.asarray(jax.jit(lambda u, x: sampling.inverse_cdf_draw(u, x, block=8))(
        u, jnp.tile(jnp.asarray(logits)[None], (n, 1))))
    counts = np.bincount(tokens, minlength=50)
    support = np.isfinite(logits)
    assert counts[~support].sum() == 0
    _, p = stats.chisquare(counts[support], _softmax(logits[support].astype(np.float64)) * n)
    assert p > 1e-3


def test_first_argmax_equals_numpy_argmax_with_ties_and_infinities():
    rng = np.random.default_rng(5)
    x = rng.integers(-3, 4, (64, 50)).astype(np.float32)  # many ties: the first index must win
    x[3] = -np.inf
    x[4, 7:] = np.inf
    x[5, 0] = -np.inf
    got = np.asarray(jax.jit(sampling.first_argmax)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    assert got.dtype == np.int32
