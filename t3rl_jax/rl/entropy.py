"""Token log-probs and policy entropy from logits.

Logits should already be divided by the sampling temperature, so that log-probs and entropy
describe the distribution the rollout actually sampled from.

With Qwen3's 151,936-token vocabulary, [tokens, vocab] float32 temporaries dominate memory; the
chunked variant walks the vocabulary in slices with an online log-sum-exp, so only one slice of
float32 softmax intermediates exists at a time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_FLOOR = float(jnp.finfo(jnp.float32).min)


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    """Entropy of softmax(logits) over the last axis: logsumexp(l) - sum(softmax(l) * l)."""
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(probs * logits, axis=-1)


def entropy_from_logprobs(logprobs: jax.Array) -> jax.Array:
    """Entropy from a full log-softmax over the last axis: -sum(p log p)."""
    logprobs = logprobs.astype(jnp.float32)
    # exp(-inf) * -inf would be NaN for tokens masked out of the distribution (top-k / top-p);
    # substituting 0 before the product keeps the gradient finite too.
    finite = jnp.isfinite(logprobs)
    safe = jnp.where(finite, logprobs, 0.0)
    plogp = jnp.where(finite, jnp.exp(safe) * safe, 0.0)
    return -jnp.sum(plogp, axis=-1)


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log softmax(logits)[token] for integer tokens shaped like logits[..., 0]."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def _merge(state, chunk):
    """Fold one vocab slice into the running (max, sum exp, sum exp * logit)."""
    m, s, t = state
    chunk = chunk.astype(jnp.float32)
    m_new = jnp.maximum(m, jnp.max(chunk, axis=-1))
    scale = jnp.exp(m - m_new)
    e = jnp.exp(chunk - m_new[..., None])
    return m_new, s * scale + jnp.sum(e, axis=-1), t * scale + jnp.sum(e * chunk, axis=-1)


def _vocab_slices(vocab: int, chunk_size: int):
    """(number of full slices, width of the tail slice or 0)."""
    return vocab // chunk_size, vocab % chunk_size


def _chunked_forward(logits, tokens, chunk_size):
    batch_shape = logits.shape[:-1]
    state = (
        jnp.full(batch_shape, _FLOOR, jnp.float32),
        jnp.zeros(batch_shape, jnp.float32),
        jnp.zeros(batch_shape, jnp.float32),
    )
    num_full, tail = _vocab_slices(logits.shape[-1], chunk_size)
    if num_full:

        def body(carry, i):
            return _merge(carry, jax.lax.dynamic_slice_in_dim(logits, i * chunk_size, chunk_size, axis=-1)), None

        state, _ = jax.lax.scan(body, state, jnp.arange(num_full))
    if tail:
        state = _merge(state, logits[..., num_full * chunk_size :])
    m, s, t = state
    lse = m + jnp.log(s)
    entropy = lse - t / s
    picked = jnp.take_along_axis(logits, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return (picked.astype(jnp.float32) - lse, entropy), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _logprobs_and_entropy(logits, tokens, chunk_size):
    return _chunked_forward(logits, tokens, chunk_size)[0]


def _fwd(logits, tokens, chunk_size):
    (logp, entropy), lse = _chunked_forward(logits, tokens, chunk_size)
    return (logp, entropy), (logits, tokens, lse, entropy)


def _bwd(chunk_size, residuals, cotangents):
    """Gradient slice by slice, from p = exp(l - lse):
    d logp / d l_j = [j == token] - p_j;  d H / d l_j = p_j (lse - H - l_j)."""
    logits, tokens, lse, entropy = residuals
    g_logp, g_entropy = (c.astype(jnp.float32)[..., None] for c in cotangents)
    lse_, ent_, tok_ = lse[..., None], entropy[..., None], tokens[..., None]

    def grad_slice(start, width):
        chunk = jax.lax.dynamic_slice_in_dim(logits, start, width, axis=-1).astype(jnp.float32)
        p = jnp.exp(chunk - lse_)
        is_token = (start + jnp.arange(width)) == tok_
        return (g_logp * (is_token - p) + g_entropy * p * (lse_ - ent_ - chunk)).astype(logits.dtype)

    grad = jnp.zeros_like(logits)
    num_full, tail = _vocab_slices(logits.shape[-1], chunk_size)
    if num_full:

        def body(i, acc):
            return jax.lax.dynamic_update_slice_in_dim(acc, grad_slice(i * chunk_size, chunk_size), i * chunk_size, -1)

        grad = jax.lax.fori_loop(0, num_full, body, grad)
    if tail:
        start = num_full * chunk_size
        grad = jax.lax.dynamic_update_slice_in_dim(grad, grad_slice(start, tail), start, -1)
    return grad, None


_logprobs_and_entropy.defvjp(_fwd, _bwd)


def logprobs_and_entropy_chunked(
    logits: jax.Array, tokens: jax.Array, *, chunk_size: int = 16384
) -> tuple[jax.Array, jax.Array]:
    """(token log-probs, entropy) in one pass over the vocabulary in `chunk_size` slices.

    Equal to `token_logprobs` and `entropy_from_logits`, gradients included: the backward pass
    recomputes probabilities one slice at a time, so the only full-vocabulary array it creates is
    the gradient itself (in the logits' dtype). A vocabulary that is not a multiple of
    `chunk_size` gets one smaller tail slice (no padded copy of the logits).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return _logprobs_and_entropy(logits, tokens, chunk_size)
