import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t3rl_jax import sharding as sh
from t3rl_jax.models import attention, chunked_attention, context_parallel as cp

MESH_SHAPES = [(1, 1, 1, 8), (1, 2, 1, 4), (2, 2, 2, 1), (1, 1, 2, 4), (2, 1, 1, 4)]


def packed_padded_batch(b=4, t=32, hq=8, hkv=4, d=8, seed=0):
    """Rows: two packed sequences + right padding; left padding; one full sequence; three segments."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, hq, d)).astype(np.float32)
    k = rng.standard_normal((b, t, hkv, d)).astype(np.float32)
    v = rng.standard_normal((b, t, hkv, d)).astype(np.float32)
    seg = np.zeros((b, t), np.int32)
    pos = np.zeros((b, t), np.int32)
    layouts = [[(1, 0, 20), (2, 20, 29)], [(3, 5, t)], [(1, 0, t)], [(1, 0, 7), (2, 7, 30), (3, 30, t)]]
    for row, spans in enumerate(layouts[:b]):
        for s, lo, hi in spans:
            seg[row, lo:hi] = s
            pos[row, lo:hi] = np.arange(hi - lo)
    return q, k, v, pos, seg


def output_and_grads(attend_fn, q, k, v, pos, seg, weights, cp_size=1):
    """Attention output and d(sum(output * weights))/d(q, k, v), tokens load-balanced for the call and
    reported in the original order."""

    def loss(q, k, v):
        lb = lambda x: cp.to_load_balanced(x, cp_size)
        out = attend_fn(lb(q), lb(k), lb(v), q_positions=lb(pos), kv_positions=lb(pos), q_segment_ids=lb(seg),
                        kv_segment_ids=lb(seg))
        out = cp.from_load_balanced(out, cp_size)
        return jnp.sum(out * weights), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def assert_close(got, want, rtol=1e-5):
    """Every array within rtol of the reference's largest magnitude."""
    for g, w in zip((got[0], *got[1]), (want[0], *want[1])):
        g, w = np.asarray(g), np.asarray(w)
        assert np.abs(g - w).max() <= rtol * np.abs(w).max(), np.abs(g - w).max() / np.abs(w).max()


# ----------------------------------------------------------------------------- load balancing


def test_load_balance_order_pairs_chunks_and_round_trips():
    order = cp.load_balance_order(16, 2)
    np.testing.assert_array_equal(order, [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11])
    x = np.arange(3 * 16).reshape(3, 16)
    np.testing.assert_array_equal(cp.from_load_balanced(cp.to_load_balanced(x, 4), 4), x)
    np.testing.assert_array_equal(cp.load_balance_order(10, 1), np.arange(10))
    batch = cp.load_balance_batch({"tokens": x, "reward": np.arange(3)}, 2)
    np.testing.assert_array_equal(batch["tokens"][0], order)
    np.testing.assert_array_equal(batch["reward"], np.arange(3))


def test_load_balance_rejects_bad_lengths():
    with pytest.raises(ValueError, match=r"sequence length 30 is not divisible by 2\*context parallelism = 8"):
        cp.load_balance_order(30, 4)
    with pytest.raises(ValueError, match=r"context parallelism must be >= 1, got 0"):
        cp.load_balance_order(8, 0)


@pytest.mark.parametrize("cp_size", [2, 4, 8])
def test_causal_work_is_equal_across_devices_after_reordering(cp_size):
    t = 64
    pos = np.arange(t)[None]
    seg = np.ones((1, t), np.int32)
    naive = cp.visible_pairs_per_shard(pos, seg, cp_size)[0]
    balanced = cp.visible_pairs_per_shard(cp.to_load_balanced(pos, cp_size), seg, cp_size)[0]
    assert balanced.sum() == naive.sum() == t * (t + 1) // 2
    assert len(set(balanced.tolist())) == 1, balanced
    assert naive.max() > 2 * naive.min()  # without reordering the last shard does most of the work
    # Packed sequences: imbalance stays within one chunk's worth of causal work.
    chunk = t // (2 * cp_size)
    _, _, _, ppos, pseg = packed_padded_batch(b=4, t=t)
    work = cp.visible_pairs_per_shard(cp.to_load_balanced(ppos, cp_size), cp.to_load_balanced(pseg, cp_size), cp_size)
    full_rows = work[2]
    assert len(set(full_rows.tolist())) == 1
    assert (work[[0, 3]].max(1) - work[[0, 3]].min(1) <= chunk * chunk * cp_size).all(), work


# ----------------------------------------------------------------------------- blockwise kernel


@pytest.mark.parametrize("block_size", [5, 8, 32, 100])
def test_flash_attention_matches_attend_values_and_grads(block_size):
    q, k, v, pos, seg = packed_padded_batch()
    w = np.random.default_rng(1).standard_normal(q.shape).astype(np.float32)
    want = output_and_grads(attention.attend, q, k, v, pos, seg, w)
    flash = lambda *a, **kw: chunked_attention.flash_attention(*a, **kw, block_size=block_size)
    assert_close(output_and_grads(flash, q, k, v, pos, seg, w), want)
    out = chunked_attention.flash_attention(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg,
                                            kv_segment_ids=seg, block_size=block_size)
    assert np.all(np.asarray(out)[0, 29:] == 0)  # padding rows give zeros


def test_flash_attention_rejects_mismatched_inputs():
    q, k, v, pos, seg = packed_padded_batch()
    with pytest.raises(ValueError, match=r"kv_positions has shape \(4, 31\), expected \(4, 32\)"):
        chunked_attention.flash_attention(q, k, v, q_positions=pos, kv_positions=pos[:, :31], q_segment_ids=seg,
                                          kv_segment_ids=seg)
    with pytest.raises(ValueError, match=r"query heads 8 are not a multiple of kv heads 3"):
        chunked_attention.flash_attention(q, k[:, :, :3], v[:, :, :3], q_positions=pos, kv_positions=pos,
                                          q_segment_ids=seg, kv_segment_ids=seg)


# ----------------------------------------------------------------------------- context parallelism


# all_gather (the default) on every mesh; the ring on the two with the longest rings.
CP_CASES = [(shape, "all_gather") for shape in MESH_SHAPES] + [((1, 1, 1, 8), "ring"), ((1, 1, 2, 4), "ring")]


@pytest.mark.parametrize("shape,strategy", CP_CASES, ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else c)
def test_cp_attention_matches_single_device(shape, strategy):
    q, k, v, pos, seg = packed_padded_batch()
    w = np.random.default_rng(2).standard_normal(q.shape).astype(np.float32)
    want = output_and_grads(attention.attend, q, k, v, pos, seg, w)
    mesh = sh.make_mesh(dict(zip(sh.MESH_AXES, shape)))
    fn = cp.make_context_parallel_attention(mesh, strategy=strategy, block_size=4)
    assert_close(output_and_grads(fn, q, k, v, pos, seg, w, cp_size=shape[3]), want)


def test_cp_attention_bad_input_names_both_numbers():
    mesh = sh.make_mesh(dict(data=1, fsdp=1, tensor=2, sequence=4))
    fn = cp.make_context_parallel_attention(mesh)
    q, k, v, pos, seg = packed_padded_batch(t=36)
    kw = dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)
    with pytest.raises(ValueError, match=r"sequence length 36 is not divisible by 2\*context parallelism = 8"):
        fn(q, k, v, **kw)
    q, k, v, pos, seg = packed_padded_batch(hq=3, hkv=1)
    kw = dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)
    with pytest.raises(ValueError, match=r"query heads 3 are not divisible by the tensor axis size 2"):
        fn(q, k, v, **kw)
    with pytest.raises(ValueError, match=r"unknown context-parallel strategy 'tree'"):
        cp.make_context_parallel_attention(mesh, strategy="tree")


@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (1, 1, 2, 4), (2, 1, 1, 4)], ids=lambda c: "x".join(map(str, c)))
def test_cp_masked_local_kernel_matches_single_device(shape):
    # The form cuDNN runs under CP (queries against all-gathered K/V, explicit mask), here with XLA's kernel on
    # CPU; the cuDNN kernel itself is checked on the GPU (tests/test_attention_backends.py).
    q, k, v, pos, seg = packed_padded_batch()
    w = np.random.default_rng(2).standard_normal(q.shape).astype(np.float32)
    want = output_and_grads(attention.attend, q, k, v, pos, seg, w)
    mesh = sh.make_mesh(dict(zip(sh.MESH_AXES, shape)))
    fn = cp.make_context_parallel_attention(mesh, local_kernel="xla")
    got = output_and_grads(fn, q, k, v, pos, seg, w, cp_size=shape[3])
    assert_close(got, want)
    assert np.all(np.asarray(got[0])[0, 29:] == 0)  # padding rows give zeros


def test_cp_local_kernel_choices_are_checked():
    mesh = sh.make_mesh(dict(data=1, fsdp=1, tensor=2, sequence=4))
    with pytest.raises(ValueError, match=r"unknown context-parallel local kernel 'splash'"):
        cp.make_context_parallel_attention(mesh, local_kernel="splash")
    with pytest.raises(ValueError, match=r"local kernel 'cudnn' runs with strategy 'all_gather' only, got 'ring'"):
        cp.make_context_parallel_attention(mesh, strategy="ring", local_kernel="cudnn")
