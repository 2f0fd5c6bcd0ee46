"""Token sampling for rollouts: temperature, top-k, top-p, greedy, with the sampled token's log-prob.

The returned log-prob is that of the distribution the token was actually drawn from: softmax(logits / temperature)
restricted to the ids the tokenizer can produce (`valid_vocab_size`; the checkpoint pads its embedding to 151,936
rows, the tokenizer has 151,669 ids), truncated by top-k / top-p and renormalised over what is kept. That is the
behaviour policy of the rollout, so with `algo.old_logprobs="rollout"` it is the right PPO anchor and with
`"trainer"` the right denominator of truncated importance sampling. The trainer's own recomputation is
log_softmax(logits / temperature) over the whole padded vocabulary and untruncated: without top-k/top-p the two
differ only by the (tiny, after training on valid ids only) mass of padded ids; with truncation the rollout's value
is larger by -log(kept mass), which is the rollout/trainer mismatch that metrics then show. With temperature 0
(greedy) the log-prob is log_softmax(logits) over the valid ids at the argmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG_INF = -jnp.inf


def scaled_logits(logits, temperature):
    """logits [B, V] / temperature [B]; rows with temperature 0 keep their raw logits (greedy)."""
    t = jnp.asarray(temperature, jnp.float32)
    t = jnp.broadcast_to(t, logits.shape[:1])
    safe_t = jnp.where(t > 0, t, 1.0)
    return logits.astype(jnp.float32) / safe_t[:, None]


def first_argmax(x):
    """`jnp.argmax(x, axis=-1)` (first index of the maximum) as two plain reductions, int32.

    XLA:CPU lowers argmax to a variadic (value, index) reduce that does not vectorise: for 32 rows it took a third
    of a small model's decode step. A max, then the smallest index holding it, give the same answer.
    """
    top = jnp.max(x, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == top, iota, x.shape[-1] - 1), axis=-1)


def top_k_mask(logits, k: int):
    """Keep the k largest logits of each row (k static; 0 keeps all). Ties at the k-th value are kept."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][:, -1:]
    return jnp.where(logits >= kth, logits, _NEG_INF)


def top_p_mask(logits, top_p):
    """Nucleus filter: keep the smallest prefix (by descending prob) whose mass reaches top_p [B] (1.0 keeps all).

    The most likely token is always kept, so a row never becomes empty.
    """
    top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), logits.shape[:1])
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p[:, None]
    keep_sorted = keep_sorted.at[:, 0].set(True)
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, _NEG_INF)


CDF_BLOCK = 1024


def inverse_cdf_draw(uniforms, logits, *, block: int = CDF_BLOCK):
    """One token per row from softmax(logits) [B, V] by inverse transform of a uniform [B] in [0, 1).

    Exact sampling with one random number per row. The Gumbel-max trick (`jax.random.categorical`) needs a random
    number and two logarithms per vocabulary entry: for Qwen3's 151,936-wide vocabulary that was ~5x slower per decode
    step on CPU. The inverse is taken in two levels: pick a block of `block` entries by the blocks' cumulative mass,
    then an entry inside it by its own cumulative mass. A prefix sum over the whole vocabulary (a reduce-window
    on XLA) cost a tenth of a tiny model's sampled decode step; the two levels scan V / block and block entries.
    Masked (-inf) entries have zero mass: a cumulative sum is flat over them and `side="right"` skips them.
    """
    b, v = logits.shape
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    blocks = -(-v // block)
    probs = jnp.pad(probs, ((0, 0), (0, blocks * block - v))).reshape(b, blocks, block)
    block_cdf = jnp.cumsum(probs.sum(axis=-1), axis=-1)  # [B, blocks]
    targets = uniforms * block_cdf[:, -1]
    chosen = jnp.minimum(jax.vmap(lambda c, t: jnp.searchsorted(c, t, side="right"))(block_cdf, targets), blocks - 1)
    inner = jnp.take_along_axis(probs, chosen[:, None, None], axis=1)[:, 0]  # [B, block]
    before = jnp.where(chosen > 0, jnp.take_along_axis(block_cdf, jnp.maximum(chosen - 1, 0)[:, None], axis=1)[:, 0],
                       0.0)
    inner_cdf = jnp.cumsum(inner, axis=-1)
    # Where the target falls inside the chosen block, as a fraction of the block's mass, kept below 1 so rounding
    # between the two sums can never step past the block's last entry with mass.
    fraction = jnp.clip((targets - before) / jnp.maximum(inner_cdf[:, -1], 1e-30), 0.0,
                        jnp.nextafter(jnp.float32(1.0), jnp.float32(0.0)))
    picks = jax.vmap(lambda c, t: jnp.searchsorted(c, t, side="right"))(inner_cdf, fraction * inner_cdf[:, -1])
    return jnp.minimum(chosen * block + picks, v - 1).astype(jnp.int32)


def mask_padded_vocab(logits, valid_vocab_size: int | None):
    """-inf at ids >= valid_vocab_size (static): padded embedding rows are never drawn and carry no mass."""
    if valid_vocab_size is None or valid_vocab_size >= logits.shape[-1]:
        return logits
    if valid_vocab_size < 1:
        raise ValueError(f"valid_vocab_size must be >= 1, got {valid_vocab_size}")
    iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.where(iota < valid_vocab_size, logits, _NEG_INF)


def _logprob_at(logits, tokens):
    """log_softmax(logits)[row, tokens[row]] without materialising the whole log_softmax."""
    picked = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def _truncated(scaled, top_p, top_k: int, use_top_p: bool):
    filtered = top_k_mask(scaled, top_k)
    return top_p_mask(filtered, top_p) if use_top_p else filtered


def sample(rng, logits, *, temperature, top_p=1.0, top_k: int = 0, use_top_p: bool = False,
           valid_vocab_size: int | None = None):
    """Sample one token per row with one PRNG key for the whole batch (see `sample_rows` for per-row keys).

    Args:
      rng: PRNG key.
      logits: [B, V].
      temperature: scalar or [B]; 0 means greedy for that row.
      top_p: scalar or [B] (only applied when ``use_top_p``; static so the sort is compiled only when wanted).
      top_k: static int, 0 = off.
      valid_vocab_size: static; ids at or above it are never sampled (None: every id is valid).
    Returns:
      (tokens [B] int32, logprobs [B] float32 under the distribution sampled from).
    """
    keys = jax.random.split(rng, logits.shape[0])
    return sample_rows(keys, logits, temperature=temperature, top_p=top_p, top_k=top_k, use_top_p=use_top_p,
                       valid_vocab_size=valid_vocab_size, skip_draw_when_greedy=False)


def sample_rows(keys, logits, *, temperature, top_p, top_k: int = 0, use_top_p: bool = False,
                valid_vocab_size: int | None = None, skip_draw_when_greedy: bool = True):
    """One token per row, each row drawn with its own PRNG key, so a row's draw depends only on its key.

    Rollouts key each token by (episode seed, token position): the same episode samples the same tokens whatever
    slot it runs in and whatever else shares the batch. On CPU, when every row is greedy (evaluation), no random
    draw over the vocabulary is made at all; on accelerators the draw is always made and the choice is a select,
    because a data-dependent branch inside the decode loop is a device-to-host round trip per step there.
    """
    b = logits.shape[0]
    t = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (b,))
    p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (b,))
    scaled = scaled_logits(mask_padded_vocab(logits, valid_vocab_size), t)
    greedy = first_argmax(scaled)

    def greedy_only():
        return greedy, _logprob_at(scaled, greedy)

    def draw():
        filtered = _truncated(scaled, p, top_k, use_top_p)
        uniforms = jax.vmap(lambda k: jax.random.uniform(k, ()))(keys)
        drawn = inverse_cdf_draw(uniforms, filtered).astype(jnp.int32)
        sampled = t > 0
        tokens = jnp.where(sampled, drawn, greedy)
        return tokens, jnp.where(sampled, _logprob_at(filtered, tokens), _logprob_at(scaled, tokens))

    if not skip_draw_when_greedy:
        return draw()
    return jax.lax.platform_dependent(
        cpu=lambda: jax.lax.cond(jnp.any(t > 0), draw, greedy_only), default=draw)


def token_keys(seeds, positions):
    """PRNG key per row from its episode seed [B] and the position [B] of the token being sampled."""
    return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(seeds, positions)
