import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t3rl_jax.rl.aggregation import aggregate, aggregation_denominator
from t3rl_jax.rl.entropy import (
    entropy_from_logits,
    entropy_from_logprobs,
    logprobs_and_entropy_chunked,
    token_logprobs,
)


def numpy_token_mean(v, m):
    return (v * m).sum() / m.sum() if m.sum() else 0.0


def numpy_seq_mean(v, m, seg=None):
    means = []
    for b in range(v.shape[0]):
        ids = [None] if seg is None else sorted(set(seg[b]) - {0})
        for s in ids:
            sel = m[b] > 0 if s is None else (m[b] > 0) & (seg[b] == s)
            if sel.any():
                means.append(v[b][sel].mean())
    return float(np.mean(means)) if means else 0.0


def random_values(seed, shape=(4, 16)):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=shape).astype(np.float32)
    m = (rng.uniform(size=shape) < 0.6).astype(np.float32)
    m[1] = 0.0  # a row with no sampled tokens
    return v, m


def test_token_mean_and_seq_mean_match_numpy():
    v, m = random_values(0)
    np.testing.assert_allclose(aggregate(v, m, "token_mean"), numpy_token_mean(v, m), rtol=1e-5)
    np.testing.assert_allclose(aggregate(v, m, "seq_mean_token_mean"), numpy_seq_mean(v, m), rtol=1e-5)


def test_seq_mean_with_packed_segments_matches_numpy():
    v, m = random_values(1, shape=(3, 20))
    seg = np.zeros((3, 20), np.int32)
    seg[0, :7], seg[0, 7:15] = 1, 2  # two episodes then padding
    seg[1, :20] = 1
    seg[2, :4], seg[2, 4:9], seg[2, 9:19] = 1, 2, 3
    m[0, 17] = 1.0  # mask set on a padding token: must still be ignored
    got = aggregate(v, m, "seq_mean_token_mean", segment_ids=seg)
    want = numpy_seq_mean(v, m * (seg > 0), seg)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    got = aggregate(v, m, "token_mean", segment_ids=seg)
    np.testing.assert_allclose(got, numpy_token_mean(v, m * (seg > 0)), rtol=1e-5)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean"])
def test_masked_tokens_do_not_matter_and_empty_mask_is_finite(mode):
    v, m = random_values(2)
    noisy = np.where(m > 0, v, np.float32(1e6))
    np.testing.assert_allclose(aggregate(v, m, mode), aggregate(noisy, m, mode), rtol=1e-6)
    zero = np.zeros_like(m)
    assert float(aggregate(v, zero, mode)) == 0.0
    grad = jax.grad(lambda x: aggregate(x, jnp.asarray(zero), mode))(jnp.asarray(v))
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad) == 0)
    grad = np.asarray(jax.grad(lambda x: aggregate(x, jnp.asarray(m), mode))(jnp.asarray(v)))
    assert np.all(grad[m == 0] == 0) and np.all(grad[m > 0] > 0)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean"])
def test_micro_batches_with_global_denominator_sum_to_full_batch(mode):
    v, m = random_values(3, shape=(8, 10))
    full = float(aggregate(v, m, mode))
    den = aggregation_denominator(m, mode)
    parts = [float(aggregate(v[i : i + 2], m[i : i + 2], mode, denominator=den)) for i in range(0, 8, 2)]
    np.testing.assert_allclose(sum(parts), full, rtol=1e-5)


def numpy_entropy(logits):
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    return -(p * np.log(p)).sum(-1)


def numpy_logprobs(logits, tokens):
    z = logits - logits.max(-1, keepdims=True)
    lsm = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return np.take_along_axis(lsm, tokens[..., None], -1)[..., 0]


@pytest.mark.parametrize("chunk", [7, 16, 100, 1000])
def test_entropy_and_logprobs_match_numpy(chunk):
    rng = np.random.default_rng(4)
    logits = (3 * rng.normal(size=(2, 5, 100))).astype(np.float32)
    tokens = rng.integers(0, 100, size=(2, 5))
    want_h = numpy_entropy(logits.astype(np.float64))
    want_lp = numpy_logprobs(logits.astype(np.float64), tokens)
    np.testing.assert_allclose(entropy_from_logits(logits), want_h, rtol=1e-5)
    np.testing.assert_allclose(token_logprobs(logits, tokens), want_lp, rtol=1e-5)
    log_softmax = np.asarray(jax.nn.log_softmax(logits))
    np.testing.assert_allclose(entropy_from_logprobs(log_softmax), want_h, rtol=1e-5)
    lp, h = jax.jit(logprobs_and_entropy_chunked, static_argnames="chunk_size")(logits, tokens, chunk_size=chunk)
    np.testing.assert_allclose(lp, want_lp, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h, want_h, rtol=1e-5, atol=1e-6)


def test_chunked_gradients_equal_plain():
    rng = np.random.default_rng(5)
    logits = jnp.asarray(2 * rng.normal(size=(3, 4, 50)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 50, size=(3, 4)))
    w = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)

    def plain(x):
        return jnp.sum(w * token_logprobs(x, tokens)) + jnp.sum(w * entropy_from_logits(x))

    def chunked(x):
        lp, h = logprobs_and_entropy_chunked(x, tokens, chunk_size=16)
        return jnp.sum(w * lp) + jnp.sum(w * h)

    np.testing.assert_allclose(jax.grad(chunked)(logits), jax.grad(plain)(logits), rtol=1e-4, atol=1e-6)


def test_entropy_from_logprobs_tolerates_excluded_tokens():
    lp = jnp.array([np.log(0.5), np.log(0.5), -np.inf], jnp.float32)  # third token filtered out
    np.testing.assert_allclose(entropy_from_logprobs(lp), np.log(2.0), rtol=1e-6)
    assert np.all(np.isfinite(jax.grad(entropy_from_logprobs)(lp)))
