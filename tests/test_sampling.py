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


def _np_sampled_distribution(logits, temperature, top_k, top_p, valid):
    """numpy reference: log-probs of the distribution sampling draws from (padded ids out, top-k, then top-p over
    what top-k kept, renormalised); -inf outside the support."""
    x = logits.astype(np.float64) / temperature
    x[valid:] = -np.inf
    if top_k:
        kth = np.sort(x)[::-1][top_k - 1]
        x = np.where(x >= kth, x, -np.inf)
    if top_p < 1:
        order = np.argsort(-x, kind="stable")
        probs = _softmax(x[order])
        before = np.cumsum(probs) - probs
        keep = before < top_p
        keep[0] = True
        drop = order[~keep]
        x[drop] = -np.inf
    finite = np.isfinite(x)
    out = np.full_like(x, -np.inf)
    out[finite] = x[finite] - np.log(np.exp(x[finite] - x[finite].max()).sum()) - x[finite].max()
    return out


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.8), (7, 0.6)])
def test_logprobs_are_those_of_the_truncated_renormalised_distribution(top_k, top_p):
    rng = np.random.default_rng(0)
    rows, vocab, valid, temperature = 32, 50, 44, 1.3
    logits = rng.standard_normal((rows, vocab)).astype(np.float32) * 3
    logits[:, valid:] += 20.0  # padded ids would dominate if they were not masked
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(1), i))(jnp.arange(rows))
    tokens, logprobs = jax.jit(lambda k, x: sampling.sample_rows(
        k, x, temperature=temperature, top_p=top_p, top_k=top_k, use_top_p=top_p < 1,
        valid_vocab_size=valid))(keys, jnp.asarray(logits))
    tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
    ref = np.stack([_np_sampled_distribution(row, temperature, top_k, top_p, valid) for row in logits])
    assert np.all(np.isfinite(ref[np.arange(rows), tokens])), "a token outside the sampled support was drawn"
    np.testing.assert_allclose(logprobs, ref[np.arange(rows), tokens], rtol=1e-5, atol=1e-5)
    # The one-key `sample` gives the same kind of value.
    tok1, lp1 = sampling.sample(jax.random.key(2), jnp.asarray(logits), temperature=temperature, top_k=top_k,
                                top_p=top_p, use_top_p=top_p < 1, valid_vocab_size=valid)
    np.testing.assert_allclose(np.asarray(lp1), ref[np.arange(rows), np.asarray(tok1)], rtol=1e-5, atol=1e-5)


def test_padded_vocabulary_ids_are_never_sampled_nor_chosen_greedily():
    vocab, valid, n = 12, 9, 20000
    logits = np.zeros(vocab, np.float32)
    logits[valid:] = 5.0  # the padded rows are the most likely without the mask
    batch = jnp.tile(jnp.asarray(logits)[None], (n, 1))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(jnp.arange(n))
    fn = jax.jit(lambda k, x, t: sampling.sample_rows(k, x, temperature=t, top_p=1.0, valid_vocab_size=valid))
    tokens, logprobs = fn(keys, batch, jnp.ones(n))
    counts = np.bincount(np.asarray(tokens), minlength=vocab)
    assert counts[valid:].sum() == 0
    _, p = stats.chisquare(counts[:valid], np.full(valid, n / valid))
    assert p > 1e-3
    np.testing.assert_allclose(np.asarray(logprobs), np.log(1 / valid), rtol=1e-5)
    greedy, greedy_lp = fn(keys[:4], batch[:4], jnp.zeros(4))
    assert np.asarray(greedy).tolist() == [0] * 4
    np.testing.assert_allclose(np.asarray(greedy_lp), np.log(1 / valid), rtol=1e-5)
    unmasked, _ = jax.jit(lambda k, x: sampling.sample_rows(k, x, temperature=0.0, top_p=1.0))(keys[:4], batch[:4])
    assert np.asarray(unmasked).tolist() == [valid] * 4  # what happened before the mask


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
