import numpy as np
import jax.numpy as jnp

from t3rl_jax.models import attention


def numpy_attention(q, k, v, qpos, kpos, qseg, kseg):
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            for i in range(t):
                vis = (kseg[bi] == qseg[bi, i]) & (qseg[bi, i] != 0) & (kseg[bi] != 0) & (kpos[bi] <= qpos[bi, i])
                if not vis.any():
                    continue
                s = k[bi, :, kh] @ q[bi, i, h] / np.sqrt(d)
                s = np.where(vis, s, -np.inf)
                p = np.exp(s - s.max())
                p /= p.sum()
                out[bi, i, h] = p @ v[bi, :, kh]
    return out


def _numpy_masked_attention(q, k, v, mask):
    """q [B, T, Hq, D], k/v [B, S, Hkv, D], mask [B, T, S] (every query sees at least one key)."""
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    s = np.where(mask[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


def test_attend_matches_numpy_with_packing_and_padding():
    rng = np.random.default_rng(0)
    b, t, hq, hkv, d = 2, 10, 4, 2, 8
    q = rng.standard_normal((b, t, hq, d)).astype(np.float32)
    k = rng.standard_normal((b, t, hkv, d)).astype(np.float32)
    v = rng.standard_normal((b, t, hkv, d)).astype(np.float32)
    # row 0: two packed sequences then padding; row 1: left padding.
    seg = np.array([[1, 1, 1, 1, 2, 2, 2, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1, 1, 1]], np.int32)
    pos = np.array([[0, 1, 2, 3, 0, 1, 2, 0, 0, 0], [0, 0, 0, 0, 1, 2, 3, 4, 5, 6]], np.int32)
    got = attention.attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_positions=pos, kv_positions=pos,
                           q_segment_ids=seg, kv_segment_ids=seg)
    want = numpy_attention(q, k, v, pos, pos, seg, seg)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(got)[0, 7:] == 0)


def test_attend_is_invariant_to_token_permutation():
    # Context parallelism reorders tokens; with positions carried along the result must permute alike.
    rng = np.random.default_rng(1)
    b, t, h, d = 1, 8, 2, 4
    q, k, v = (rng.standard_normal((b, t, h, d)).astype(np.float32) for _ in range(3))
    pos = np.arange(t, dtype=np.int32)[None]
    seg = np.ones((b, t), np.int32)
    perm = np.array([0, 7, 1, 6, 2, 5, 3, 4])
    base = np.asarray(attention.attend(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg))
    permuted = np.asarray(attention.attend(q[:, perm], k[:, perm], v[:, perm], q_positions=pos[:, perm],
                                           kv_positions=pos[:, perm], q_segment_ids=seg, kv_segment_ids=seg))
    np.testing.assert_allclose(permuted, base[:, perm], rtol=1e-5, atol=1e-6)


def test_cache_attention_equals_dense_for_decode_and_prefill_chunks():
    # The cache path takes keys as [B, Hkv, D, S] and values as [B, Hkv, S, D], the cache's layouts. Covers one row with >= 128 keys,
    # where an earlier multiply-and-reduce form was wrong on XLA CPU, and chunks of several queries.
    import jax

    rng = np.random.default_rng(2)
    for b, t, s in ((1, 1, 64), (1, 1, 128), (1, 1, 1000), (3, 1, 300), (2, 5, 40), (3, 16, 130), (2, 23, 50)):
        q = rng.standard_normal((b, t, 4, 8)).astype(np.float32)
        k, v = (rng.standard_normal((b, s, 2, 8)).astype(np.float32) for _ in range(2))
        mask = rng.random((b, t, s)) < 0.6
        mask[:, :, 0] = True
        want = _numpy_masked_attention(q, k, v, mask)
        for block in (8, attention.CACHE_QUERY_BLOCK):  # long chunks go in query blocks (8: 2-3 blocks, padded)
            fn = jax.jit(lambda *a: attention.cache_attention(*a, query_block=block))
            got = np.asarray(fn(q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), mask))
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)