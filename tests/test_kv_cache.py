"""KV-cache decoding equals the full forward, with rows of different lengths and padding layouts."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t3rl_jax.models import kv_cache as kvc
from t3rl_jax.models.model_config import TINY
from t3rl_jax.models.qwen3 import Qwen3

CFG = dataclasses.replace(TINY, vocab_size=512, num_layers=2, num_heads=4, num_kv_heads=2)
MAX_LEN = 32


@pytest.fixture(scope="module")
def setup():
    model = Qwen3(CFG, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, donate_argnums=(4,))
    def step(state, tokens, positions, segments, cache):
        return nnx.merge(graphdef, state)(tokens, positions, segments, kv_cache=cache)

    @jax.jit
    def full(state, tokens, positions, segments):
        return nnx.merge(graphdef, state)(tokens, positions, segments)

    return state, step, full


def _sequences(seed, prompt_lens, n_new):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, CFG.vocab_size, n + n_new).astype(np.int32) for n in prompt_lens]


def _reference(full, state, seqs):
    """Logits of each row's whole sequence, run right-padded in one forward: row -> [len, V]."""
    t = max(len(s) for s in seqs)
    tokens = np.zeros((len(seqs), t), np.int32)
    seg = np.zeros_like(tokens)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)], seg[i, :len(s)] = s, 1
    pos = np.tile(np.arange(t, dtype=np.int32), (len(seqs), 1))
    logits = np.asarray(full(state, tokens, pos, seg))
    return [logits[i, :len(s)] for i, s in enumerate(seqs)]


def _run_chunks(step, state, cache, seqs, starts, chunk_sizes, width, left_pad=False):
    """Feed rows chunk by chunk (each row its own chunk sizes, padded to `width`); collect
    logits per row in feed order."""
    b = len(seqs)
    got = [[] for _ in range(b)]
    offsets = list(starts)
    for sizes in chunk_sizes:
        tokens = np.zeros((b, width), np.int32)
        seg = np.zeros_like(tokens)
        pos = np.zeros_like(tokens)
        for i, n in enumerate(sizes):
            sl = slice(width - n, width) if left_pad else slice(0, n)
            tokens[i, sl] = seqs[i][offsets[i]:offsets[i] + n]
            pos[i, sl] = np.arange(offsets[i], offsets[i] + n)
            seg[i, sl] = 1
        logits, cache = step(state, tokens, pos, seg, cache)
        logits = np.asarray(logits)
        for i, n in enumerate(sizes):
            sl = slice(width - n, width) if left_pad else slice(0, n)
            got[i].append(logits[i, sl])
            offsets[i] += n
    return [np.concatenate(g) if g else np.zeros((0, CFG.vocab_size)) for g in got], cache


def test_prefill_then_token_by_token_decode_equals_full_forward(setup):
    state, step, full = setup
    prompt_lens, n_new = [5, 9, 2], 6
    seqs = _sequences(1, prompt_lens, n_new)
    want = _reference(full, state, seqs)
    cache = kvc.KVCache.for_config(CFG, batch=3, max_len=MAX_LEN)
    got, cache = _run_chunks(step, state, cache, seqs, [0, 0, 0], [prompt_lens], max(prompt_lens))
    got2, cache = _run_chunks(step, state, cache, seqs, prompt_lens, [[1, 1, 1]] * n_new, 1)
    for i in range(3):
        np.testing.assert_allclose(np.concatenate([got[i], got2[i]]), want[i], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache.lengths), np.array(prompt_lens) + n_new)
    assert int(np.asarray(cache.segment_ids).sum()) == sum(prompt_lens) + 3 * n_new


def test_chunked_decode_with_uneven_left_padded_chunks_equals_full_forward(setup):
    state, step, full = setup
    seqs = _sequences(2, [4, 7, 3], 0)
    seqs = [np.concatenate([s, extra]) for s, extra in zip(seqs, _sequences(3, [8, 5, 9], 0))]
    want = _reference(full, state, seqs)
    cache = kvc.KVCache.for_config(CFG, batch=3, max_len=MAX_LEN)
    # Each row advances by its own amount per call; zero means the row idles (all padding).
    chunks = [[3, 3, 1], [3, 0, 3], [0, 3, 3], [3, 3, 3], [3, 3, 2]]
    got, cache = _run_chunks(step, state, cache, seqs, [0, 0, 0], chunks, 3, left_pad=True)
    for i in range(3):
        n = sum(c[i] for c in chunks)
        np.testing.assert_allclose(got[i], want[i][:n], atol=1e-5)


def test_insert_prefilled_row_into_a_busy_slot(setup):
    state, step, full = setup
    seqs = _sequences(4, [6, 3], 4)
    want = _reference(full, state, seqs)
    # Slot 1 first hosts an unrelated sequence, then is cleared and receives a fresh prefill.
    cache = kvc.KVCache.for_config(CFG, batch=2, max_len=MAX_LEN)
    junk = _sequences(5, [0, 10], 0)
    _, cache = _run_chunks(step, state, cache, [seqs[0], junk[1]], [0, 0], [[6, 10]], 10)
    cache = kvc.clear_rows(cache, jnp.array([False, True]))
    prefix = kvc.KVCache.for_config(CFG, batch=1, max_len=MAX_LEN)
    prefill_logits, prefix = _run_chunks(step, state, prefix, [seqs[1]], [0], [[3]], 3)
    cache = jax.jit(kvc.insert_rows, static_argnums=2)(cache, prefix, 1)
    got, cache = _run_chunks(step, state, cache, seqs, [6, 3], [[1, 1]] * 4, 1)
    np.testing.assert_allclose(prefill_logits[0], want[1][:3], atol=1e-5)
    np.testing.assert_allclose(got[0], want[0][6:], atol=1e-5)
    np.testing.assert_allclose(got[1], want[1][3:], atol=1e-5)


def test_write_indices_match_numpy():
    seg = np.array([[0, 0, 1, 1], [1, 0, 1, 0], [1, 1, 1, 1]], np.int32)
    lengths = np.array([3, 0, 30], np.int32)
    want = np.full(seg.shape, 32)
    for b in range(3):
        k = lengths[b]
        for t in range(4):
            if seg[b, t]:
                want[b, t] = k
                k += 1
    np.testing.assert_array_equal(np.asarray(kvc.write_indices(jnp.asarray(lengths), jnp.asarray(seg), 32)), want)


def test_cache_logical_axes_cover_every_field():
    cache = kvc.KVCache.for_config(CFG, batch=2, max_len=8)
    axes = cache.logical_axes()
    names = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(n, str) for n in x))
    arrays = jax.tree.leaves(cache)
    assert len(names) == len(arrays) == 2 * CFG.num_layers + 3
    for arr, axis_names in zip(arrays, names):
        assert arr.ndim == len(axis_names) and axis_names[0] == "batch"
    assert cache.k[0].shape == (2, CFG.num_kv_heads, CFG.head_dim, 8)
    assert cache.v[0].shape == (2, CFG.num_kv_heads, 8, CFG.head_dim)


def test_attending_within_a_cache_window_equals_the_whole_cache(setup):
    state, step, full = setup
    graphdef = nnx.graphdef(Qwen3(CFG, rngs=nnx.Rngs(0)))

    @functools.partial(jax.jit, donate_argnums=(4,))
    def windowed_step(state, tokens, positions, segments, cache):
        return nnx.merge(graphdef, state)(tokens, positions, segments, kv_cache=cache, cache_window=8)

    seqs = _sequences(6, [4, 2], 2)  # rows reach 6 and 4 tokens: within the first 8 of 32 cache slots
    outputs = []
    for fn in (step, windowed_step):
        cache = kvc.KVCache.for_config(CFG, batch=2, max_len=MAX_LEN)
        prefill, cache = _run_chunks(fn, state, cache, seqs, [0, 0], [[4, 2]], 4)
        decode, cache = _run_chunks(fn, state, cache, seqs, [4, 2], [[1, 1]] * 2, 1)
        outputs.append((prefill, decode, np.asarray(cache.k[0]), np.asarray(cache.v[-1])))
    for a, b in zip(jax.tree.leaves(outputs[0]), jax.tree.leaves(outputs[1])):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_step_donates_the_cache(setup):
    state, step, _ = setup
    cache = kvc.KVCache.for_config(CFG, batch=1, max_len=8)
    ones = np.ones((1, 1), np.int32)
    _, new_cache = step(state, ones, ones * 0, ones, cache)
    # updated in place, no second cache buffer
    assert all(k.is_deleted() for k in cache.k) and all(v.is_deleted() for v in cache.v)
    assert int(new_cache.lengths[0]) == 1
