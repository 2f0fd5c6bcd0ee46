"""Attention backends: selection per platform, numerics against the reference where a kernel runs on CPU
(blockwise; splash in Pallas interpret mode), the cuDNN packed-layout segment table, and compile-for-H200 /
v5p facts of the fused kernels (custom calls present, no `conditional` inside a loop)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t3rl_jax import sharding as sh
from t3rl_jax.models import attention, attention_backends as ab, chunked_attention as ca, kernel_hlo
from t3rl_jax.models import context_parallel as cp
from t3rl_jax.models import cudnn_attention

# ----------------------------------------------------------------------------- selection


def test_auto_picks_the_platform_kernel():
    assert ab.resolve_backend("auto", "cuda") == "cudnn"
    assert ab.resolve_backend("auto", "gpu") == "cudnn"
    assert ab.resolve_backend("auto", "tpu") == "splash"
    assert ab.resolve_backend("auto", "cpu") == "blockwise"
    # Context parallelism keeps the platform's kernel (against all-gathered K/V).
    assert ab.resolve_backend("auto", "cuda", cp=2) == "cudnn"
    assert ab.resolve_backend("auto", "tpu", cp=4) == "splash"
    assert ab.resolve_backend("auto", "cpu", cp=4) == "blockwise"
    # cuDNN's flash kernels take 16-bit inputs; a float32 model stays on the blockwise kernel.
    assert ab.resolve_backend("auto", "cuda", dtype="float32") == "blockwise"
    assert ab.resolve_backend("auto", "cuda", dtype="bfloat16") == "cudnn"
    assert ab.resolve_backend("xla", "tpu") == "xla"
    assert ab.resolve_backend("blockwise", "cuda", cp=8) == "blockwise"


def test_bad_choices_name_the_key_and_numbers():
    with pytest.raises(ValueError, match=r"model.attention='flash' unknown"):
        ab.resolve_backend("flash", "cpu")
    with pytest.raises(ValueError, match=r"model.attention='cudnn' needs a cuda platform, but the mesh is on cpu"):
        ab.resolve_backend("cudnn", "cpu")
    with pytest.raises(ValueError, match=r"needs bfloat16 or float16 activations, got model.dtype=float32"):
        ab.resolve_backend("cudnn", "cuda", dtype="float32")
    with pytest.raises(ValueError, match=r"unknown platform 'rocm'"):
        ab.resolve_backend("auto", "rocm")


def test_config_accepts_backends_and_rejects_bad_pairs():
    from configs import tiny
    from t3rl_jax.config_checks import ConfigError, validate

    cfg = tiny.get_config()
    assert cfg.model.attention == "auto"
    for name in ab.BACKENDS:
        cfg.model.attention = name
        if name != "cudnn":  # tiny runs in float32
            validate(cfg)
    cfg.model.attention = "cudnn"
    with pytest.raises(ConfigError, match=r"model.attention.*'cudnn' needs model.dtype='bfloat16'"):
        validate(cfg)
    cfg.model.attention = "flash"
    with pytest.raises(ConfigError, match=r"model.attention"):
        validate(cfg)


# ----------------------------------------------------------------------------- blockwise schedule


def test_causal_schedule_skips_tiles_after_their_queries():
    sched = ca.tile_schedule(np.arange(64), np.arange(64), 16, 16)
    assert sched.tolist() == [[i, j, 1] for i in range(4) for j in range(i + 1)]
    assert len(ca.tile_schedule(np.arange(64), np.arange(64), 16, 16, causal=False)) == 16
    # Query blocks smaller than key blocks: a key block is visited once any query of the block may see it.
    assert ca.tile_schedule(np.arange(8), np.arange(8), 2, 4)[:, :2].tolist() == [[0, 0], [1, 0], [2, 0], [2, 1],
                                                                                  [3, 0], [3, 1]]


@pytest.mark.parametrize("cp_size", [2, 4])
def test_load_balanced_schedules_give_every_device_the_same_tiles(cp_size):
    t_local = 64 // cp_size
    table = cp._device_schedules(t_local, t_local, cp_size, 8, 8, ring=False)
    live = table[:, :, 2].sum(axis=1)
    assert len(set(live.tolist())) == 1, live
    assert live[0] * cp_size < (64 // 8) ** 2  # fewer than all tiles: the causal half is skipped
    ring = cp._device_schedules(t_local, t_local, cp_size, 8, 8, ring=True)
    assert ring.shape[:2] == (cp_size, cp_size)
    assert len(set(ring[:, :, :, 2].sum(axis=(1, 2)).tolist())) == 1


def _grad_hlo(fn, b=2, t=64, hq=4, hkv=2, d=8):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((b, t, hq, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, t, hkv, d)).astype(np.float32) for _ in range(2))
    pos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    seg = np.ones((b, t), np.int32)

    def loss(q, k, v):
        return fn(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg).sum()

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()


def test_blockwise_kernel_has_no_conditional_in_its_loops():
    # Before the static schedule, each visited tile was a `lax.cond` on its mask (3 per layer in fwd + bwd).
    text = _grad_hlo(functools.partial(ca.flash_attention, block_size=16))
    assert "while" in text
    assert kernel_hlo.conditionals_in_loops(text) == []


def test_cp_kernels_have_no_conditional_in_their_loops():
    mesh = sh.make_mesh(dict(data=1, fsdp=1, tensor=2, sequence=4))
    for strategy in cp.STRATEGIES:
        text = _grad_hlo(cp.make_context_parallel_attention(mesh, strategy=strategy, block_size=8))
        assert "while" in text
        assert kernel_hlo.conditionals_in_loops(text) == [], strategy


def test_hlo_reader_finds_conditionals_inside_loops():
    def body(i, x):
        return jax.lax.cond(x.sum() > 0, lambda y: y * 2, lambda y: y - 1, x)

    looped = jax.jit(lambda x: jax.lax.fori_loop(0, 3, body, x)).lower(jnp.ones(4)).compile().as_text()
    assert len(kernel_hlo.conditionals_in_loops(looped)) == 1
    flat = jax.jit(lambda x: body(0, x)).lower(jnp.ones(4)).compile().as_text()
    assert kernel_hlo.conditionals_in_loops(flat) == []


# ----------------------------------------------------------------------------- splash (interpret mode)


def _packed_rows(b=4, t=256, hq=4, hkv=2, d=128, seed=0):
    """Rows: two packed sequences + right padding; left padding; one full row; three segments."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, hq, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, t, hkv, d)).astype(np.float32) for _ in range(2))
    seg, pos = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
    layouts = [[(1, 0, 150), (2, 150, 230)], [(3, 40, t)], [(1, 0, t)], [(1, 0, 60), (2, 60, 200), (3, 200, t)]]
    for row, spans in enumerate(layouts[:b]):
        for s, lo, hi in spans:
            hi = min(hi, t)
            seg[row, lo:hi] = s
            pos[row, lo:hi] = np.arange(max(hi - lo, 0))
    return q, k, v, pos, seg


def _value_and_grads(fn, q, k, v, pos, seg, w):
    def loss(q, k, v):
        out = fn(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)
        return jnp.sum(out * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return [np.asarray(x) for x in (out, *grads)]


@pytest.mark.slow
def test_splash_context_parallel_matches_reference_values_and_grads():
    # Load-balanced token order over sequence=4 (tensor=2); K/V all-gathered, mask causal in the original order.
    q, k, v, pos, seg = _packed_rows(b=2, t=512)
    w = np.random.default_rng(1).standard_normal(q.shape).astype(np.float32)
    mesh = sh.make_mesh(dict(data=1, fsdp=1, tensor=2, sequence=4))
    fn = ab.get_attention("auto", platform="tpu", mesh=mesh, interpret=True)
    lb, back = (lambda x: cp.to_load_balanced(x, 4)), (lambda x: cp.from_load_balanced(x, 4))
    want = _value_and_grads(attention.attend, q, k, v, pos, seg, w)
    got = _value_and_grads(fn, lb(q), lb(k), lb(v), lb(pos), lb(seg), lb(w))
    for g, r in zip(got, want):
        g = back(g)
        assert np.abs(g - r).max() <= 1e-4 * np.abs(r).max()


def test_load_balanced_original_index_inverts_the_cp_order():
    from t3rl_jax.models import splash_attention

    for size in (2, 4):
        slots = np.arange(64)
        np.testing.assert_array_equal(splash_attention.original_index(slots, 64 // (2 * size), size),
                                      cp.load_balance_order(64, size))


@pytest.mark.slow
def test_splash_matches_reference_values_and_grads_on_a_mesh():
    # Pallas interpret mode runs the TPU kernel's program on the CPU; batch and heads split over 8 fake devices.
    q, k, v, pos, seg = _packed_rows()
    w = np.random.default_rng(1).standard_normal(q.shape).astype(np.float32)
    mesh = sh.make_mesh(dict(data=2, fsdp=2, tensor=2, sequence=1))
    fn = ab.get_attention("splash", platform="tpu", mesh=mesh, interpret=True)
    want = _value_and_grads(attention.attend, q, k, v, pos, seg, w)
    got = _value_and_grads(functools.partial(fn), q, k, v, pos, seg, w)
    for g, r in zip(got, want):
        assert np.abs(g - r).max() <= 1e-4 * np.abs(r).max()
    assert np.all(got[0][0, 230:] == 0) and np.all(got[0][1, :40] == 0)  # padding rows give zeros


def test_splash_rejects_lengths_off_its_block():
    from t3rl_jax.models import splash_attention

    q, k, v, pos, seg = _packed_rows(b=1, t=200)
    with pytest.raises(ValueError, match=r"sequence length 200 to be a multiple of its block 128"):
        splash_attention.attend(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg,
                                block_size=128, interpret=True)


# ----------------------------------------------------------------------------- cuDNN packed layout


def _numpy_segment_table(seg, m):
    lengths = np.full((len(seg), m), -1)
    offsets = np.full((len(seg), m + 1), -1)
    overflow = np.zeros(seg.shape, bool)
    for r, row in enumerate(seg):
        runs, start = [], None
        for i, s in enumerate(list(row) + [0]):
            if start is not None and (s != row[start]):
                runs.append((start, i - start))
                start = None
            if s != 0 and start is None:
                start = i
        for n, (lo, length) in enumerate(runs):
            if n < m:
                lengths[r, n], offsets[r, n] = length, lo
            else:
                overflow[r, lo:lo + length] = True
    return lengths, offsets, overflow


def test_segment_table_matches_numpy_runs():
    _, _, _, _, seg = _packed_rows()
    seg = np.concatenate([seg, np.array([[0, 1, 1, 2, 2, 2, 0, 3, 1, 1] + [0] * 246], np.int32)])
    for m in (1, 3, 8):
        got = [np.asarray(x) for x in jax.jit(cudnn_attention.segment_table, static_argnums=1)(seg, m)]
        for g, w in zip(got, _numpy_segment_table(seg, m)):
            np.testing.assert_array_equal(g, w)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN runs on a CUDA GPU only (scripts/gpu_check.py)")
def test_cudnn_matches_reference_values_and_grads_on_gpu():
    q, k, v, pos, seg = _packed_rows()
    w = np.random.default_rng(1).standard_normal(q.shape).astype(np.float32)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)
    want = _value_and_grads(attention.attend, q, k, v, pos, seg, w)
    got = _value_and_grads(ab.get_attention("cudnn"), bf(q), bf(k), bf(v), pos, seg, bf(w))
    for g, r in zip(got, want):
        assert np.abs(g.astype(np.float32) - r).max() <= 3e-2 * np.abs(r).max()
    assert np.all(got[0][0, 230:] == 0) and np.all(got[1][0, 230:] == 0)  # padding: zero output, zero dq


# ----------------------------------------------------------------------------- compile for H200 / v5p


def _target_mesh(name):
    from t3rl_jax.accel import targets

    try:
        return targets.mesh_for(name, {"data": 1, "fsdp": 8, "tensor": 1, "sequence": 1})
    except targets.TargetError as e:
        pytest.skip(str(e))


def _compile_grad(fn, mesh, b=8, t=1024, hq=32, hkv=8, d=128):
    from jax.sharding import NamedSharding, PartitionSpec as P

    rows = NamedSharding(mesh, P(("data", "fsdp")))
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rows)

    def loss(q, k, v, pos, seg):
        out = fn(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)
        return out.astype(jnp.float32).sum()

    args = (sds((b, t, hq, d), jnp.bfloat16), sds((b, t, hkv, d), jnp.bfloat16), sds((b, t, hkv, d), jnp.bfloat16),
            sds((b, t), jnp.int32), sds((b, t), jnp.int32))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower().compile()


@pytest.mark.slow
def test_h200_auto_attention_is_cudnn_fused_without_loop_conditionals():
    mesh = _target_mesh("h200")
    text = _compile_grad(ab.get_attention("auto", mesh=mesh), mesh).as_text()
    calls = kernel_hlo.fused_attention_calls(text)
    assert calls.get("__cudnn$fmhaSoftmax", 0) >= 1 and calls.get("__cudnn$fmhaSoftmaxBackward", 0) >= 1, calls
    assert kernel_hlo.conditionals_in_loops(text) == []
    text = _compile_grad(ab.get_attention("blockwise", mesh=mesh), mesh).as_text()
    assert "while" in text and kernel_hlo.conditionals_in_loops(text) == []


@pytest.mark.slow
def test_h200_context_parallel_attention_is_cudnn_fused():
    from t3rl_jax.accel import targets

    try:
        mesh = targets.mesh_for("h200", {"data": 1, "fsdp": 2, "tensor": 1, "sequence": 4})
    except targets.TargetError as e:
        pytest.skip(str(e))
    text = _compile_grad(ab.get_attention("auto", mesh=mesh), mesh, b=2).as_text()
    calls = kernel_hlo.fused_attention_calls(text)  # the mask travels as cuDNN's bias
    assert calls.get("__cudnn$fmhaScaleBiasSoftmax", 0) >= 1, calls
    assert calls.get("__cudnn$fmhaScaleBiasSoftmaxBackward", 0) >= 1, calls
    assert kernel_hlo.conditionals_in_loops(text) == []


@pytest.mark.slow
@pytest.mark.parametrize("axes", [dict(data=1, fsdp=8, tensor=1, sequence=1), dict(data=1, fsdp=2, tensor=1,
                                                                                    sequence=4)],
                         ids=["fsdp8", "cp4"])
def test_v5p_auto_attention_is_splash(axes):
    from t3rl_jax.accel import targets

    try:
        mesh = targets.mesh_for("v5p", axes)
    except targets.TargetError as e:
        pytest.skip(str(e))
    text = _compile_grad(ab.get_attention("auto", mesh=mesh), mesh, b=8 // axes["sequence"]).as_text()
    assert kernel_hlo.fused_attention_calls(text).get("tpu_custom_call", 0) >= 2  # forward and backward kernels
    assert kernel_hlo.conditionals_in_loops(text) == []


@pytest.mark.slow
def test_h200_cache_attention_decode_loop_has_no_conditional():
    # The decode loop's attention (the engine's generate loop runs it once per step and layer).
    mesh = _target_mesh("h200")
    from jax.sharding import NamedSharding, PartitionSpec as P

    rows = NamedSharding(mesh, P(("data", "fsdp")))
    b, hq, hkv, d, s = 8, 32, 8, 128, 2048

    def decode(q, k_cache, v_cache, mask):
        def step(i, q):
            return attention.cache_attention(q, k_cache, v_cache, mask).astype(q.dtype)

        return jax.lax.fori_loop(0, 4, step, q)

    args = (jax.ShapeDtypeStruct((b, 1, hq, d), jnp.bfloat16, sharding=rows),
            jax.ShapeDtypeStruct((b, hkv, d, s), jnp.bfloat16, sharding=rows),
            jax.ShapeDtypeStruct((b, hkv, s, d), jnp.bfloat16, sharding=rows),
            jax.ShapeDtypeStruct((b, 1, s), jnp.bool_, sharding=rows))
    text = jax.jit(decode).trace(*args).lower().compile().as_text()
    assert "while" in text and kernel_hlo.conditionals_in_loops(text) == []
