"""Vocab-parallel log-probs / entropy: equal to a numpy log-softmax and to the single-device gradients on every
mesh shape, compiled without a table-sized buffer, and the sharded GRPO step equals the single-device one."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from t3rl_jax import sharding as sh
from t3rl_jax.models import context_parallel as cp
from t3rl_jax.models.embedding import make_sharded_embedding_lookup
from t3rl_jax.models.model_config import Qwen3Config
from t3rl_jax.models.qwen3 import Qwen3
from t3rl_jax.rl.entropy import entropy_from_logits, token_logprobs
from t3rl_jax.rl.grpo import LossSettings
from t3rl_jax.rl.train_step import GRPOStep, StepSettings, vocab_parallel_for
from t3rl_jax.rl.vocab_parallel import VocabParallelLogprobs

ROWS, N, EMBED, VOCAB, TEMP = 8, 8, 16, 64, 0.7
CASES = [((1, 2, 2, 2), True), ((2, 2, 2, 1), False), ((1, 1, 8, 1), False), ((1, 8, 1, 1), False),
         ((1, 2, 1, 4), True), ((2, 1, 1, 4), True), ((1, 1, 2, 4), True)]


def _ids(case):
    shape, over_seq = case
    return "x".join(map(str, shape)) + ("_w-seq" if over_seq else "")


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    h = rng.standard_normal((ROWS, N, EMBED)).astype(np.float32)
    w = (0.5 * rng.standard_normal((EMBED, VOCAB))).astype(np.float32)
    t = rng.integers(0, VOCAB, (ROWS, N)).astype(np.int32)
    g_logp, g_ent = (rng.standard_normal((ROWS, N)).astype(np.float32) for _ in range(2))
    return h, w, t, g_logp, g_ent


def _numpy_stats(h, w, t):
    logits = np.einsum("rce,ev->rcv", h.astype(np.float64), w.astype(np.float64)) / TEMP
    ls = logits - logits.max(-1, keepdims=True)
    ls -= np.log(np.exp(ls).sum(-1, keepdims=True))
    return np.take_along_axis(ls, t[..., None], -1)[..., 0], -(np.exp(ls) * ls).sum(-1)


def _layout(shape, over_seq):
    mesh = sh.make_mesh(dict(zip(sh.MESH_AXES, shape)))
    rules = sh.logical_axis_rules(fsdp_over_sequence=over_seq)
    return (mesh, sh.logical_to_spec(("embed", "vocab"), rules, mesh=mesh),
            sh.logical_to_spec(("batch", "length"), rules, mesh=mesh))


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_values_and_grads_equal_single_device(inputs, case):
    h, w, t, g_logp, g_ent = inputs
    mesh, w_spec, t_spec = _layout(*case)
    vp = VocabParallelLogprobs(mesh, w_spec, t_spec)

    def sharded(h, w):
        logp, ent = vp(h, vp.shard_weight(w), t, temperature=TEMP, compute_dtype=jnp.float32)
        return jnp.sum(logp * g_logp) + jnp.sum(ent * g_ent), (logp, ent)

    def plain(h, w):
        logits = jnp.einsum("rce,ev->rcv", h, w) / TEMP
        logp, ent = token_logprobs(logits, t), entropy_from_logits(logits)
        return jnp.sum(logp * g_logp) + jnp.sum(ent * g_ent), (logp, ent)

    h_sh = NamedSharding(mesh, PartitionSpec(*t_spec, None))
    w_sh = NamedSharding(mesh, w_spec)
    (_, (logp, ent)), (dh, dw) = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1), has_aux=True),
                                         in_shardings=(h_sh, w_sh))(h, w)
    _, (want_dh, want_dw) = jax.value_and_grad(plain, argnums=(0, 1), has_aux=True)(h, w)
    want_logp, want_ent = _numpy_stats(h, w, t)
    np.testing.assert_allclose(np.asarray(logp), want_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), want_ent, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dh), np.asarray(want_dh), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), np.asarray(want_dw), rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_named():
    mesh, w_spec, t_spec = _layout((1, 2, 1, 4), True)
    vp = VocabParallelLogprobs(mesh, w_spec, t_spec)
    with pytest.raises(ValueError, match=r"hidden \[rows, n, E\]"):
        vp(jnp.zeros((ROWS, N, EMBED)), jnp.zeros((EMBED + 1, VOCAB)), jnp.zeros((ROWS, N), jnp.int32),
           temperature=1.0, compute_dtype=jnp.float32)
    with pytest.raises(ValueError, match="dimension 1 of size 6 is not divisible by its 4 token shards"):
        vp(jnp.zeros((ROWS, 6, EMBED)), jnp.zeros((EMBED, VOCAB)), jnp.zeros((ROWS, 6), jnp.int32),
           temperature=1.0, compute_dtype=jnp.float32)


def test_compiled_projection_holds_no_table_sized_buffer():
    """Stage 2's layout with a 32k vocabulary: forward + backward of one chunk needs less temporary memory per
    device than a third of one replicated weight, where GSPMD's einsum of the same chunk needs more than a weight."""
    mesh, w_spec, t_spec = _layout((1, 2, 1, 4), True)
    vp = VocabParallelLogprobs(mesh, w_spec, t_spec)
    rows, n, embed, vocab = 2, 64, 1024, 32768
    weight_bytes = embed * vocab * 4
    targets = jnp.zeros((rows, n), jnp.int32)

    def explicit(h, w):
        logp, ent = vp(h, vp.shard_weight(w), targets, temperature=1.0, compute_dtype=jnp.bfloat16)
        return jnp.sum(logp) + jnp.sum(ent)

    def implicit(h, w):
        logits = jnp.einsum("rce,ev->rcv", h.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                            preferred_element_type=jnp.float32)
        return jnp.sum(token_logprobs(logits, targets)) + jnp.sum(entropy_from_logits(logits))

    def temp_bytes(loss):
        fn = jax.jit(jax.grad(loss, argnums=(0, 1)),
                     in_shardings=(NamedSharding(mesh, PartitionSpec(*t_spec, None)), NamedSharding(mesh, w_spec)))
        args = (jax.ShapeDtypeStruct((rows, n, embed), jnp.float32), jax.ShapeDtypeStruct((embed, vocab), jnp.float32))
        return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes

    got = temp_bytes(explicit)
    assert got < weight_bytes, (got, weight_bytes)
    assert temp_bytes(implicit) > weight_bytes > 3 * got, got


CFG = Qwen3Config(vocab_size=256, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  intermediate_size=64)


@pytest.mark.parametrize("shape,tied", [((1, 2, 1, 4), True), ((2, 2, 2, 1), False)],
                         ids=["cp4-tied", "tp2-untied-compact"])
def test_sharded_grpo_step_equals_single_device(shape, tied):
    """The trainer's layout (weights over fsdp x sequence, explicit embedding lookup, CP attention, vocab-parallel
    loss, logits only at loss positions, under CP compacted per sequence shard): gradients and metrics of one
    micro-batch equal the unsharded step's."""
    cfg = dataclasses.replace(CFG, tie_word_embeddings=tied)
    rows, length = 4, 128
    mesh = sh.make_mesh(dict(zip(sh.MESH_AXES, shape)))
    rules = sh.logical_axis_rules(fsdp_over_sequence=True)
    plain_model = Qwen3(cfg, rngs=nnx.Rngs(0))
    params = nnx.state(plain_model, nnx.Param)
    attention = (cp.make_context_parallel_attention(mesh, rules, block_size=8) if mesh.shape["sequence"] > 1
                 else plain_model.attention_fn)
    sharded_model = Qwen3(cfg, rngs=nnx.Rngs(0), attention_fn=attention,
                          activation_constraint=sh.make_activation_constraint(mesh, rules),
                          embedding_fn=make_sharded_embedding_lookup(mesh, rules))
    param_sh = sh.state_shardings(params, mesh, rules)
    batch_sh = NamedSharding(mesh, sh.logical_to_spec(("batch", "length"), rules, mesh=mesh))
    assert vocab_parallel_for(sharded_model, param_sh, batch_sh) is not None

    rng = np.random.default_rng(3)
    segment_ids = np.ones((rows, length), np.int32)
    segment_ids[1, 40:] = 0
    mb = {"tokens": rng.integers(0, cfg.vocab_size, (rows, length)).astype(np.int32),
          "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)), "segment_ids": segment_ids,
          "targets": rng.integers(0, cfg.vocab_size, (rows, length)).astype(np.int32),
          "loss_mask": (rng.random((rows, length)) < 0.15).astype(np.float32) * (segment_ids > 0),
          "rollout_logprobs": -rng.random((rows, length)).astype(np.float32),
          "advantages": rng.standard_normal((rows, length)).astype(np.float32)}
    old = mb["rollout_logprobs"] + 0.05 * rng.standard_normal((rows, length)).astype(np.float32)
    denominator = np.float32(mb["loss_mask"].sum())
    cp_size = mesh.shape["sequence"]
    settings = StepSettings(LossSettings(entropy_coef=0.01), temperature=0.8, seq_chunk=8)

    plain = GRPOStep(plain_model, None, settings, donate=False)
    want_g, want_m = plain.functions_for(plain.slots_for(mb))[1](params, mb, old, old, denominator, np.bool_(False))
    sharded = GRPOStep(sharded_model, None, settings, param_shardings=param_sh, batch_sharding=batch_sh,
                       donate=False)
    lb = {k: cp.to_load_balanced(v, cp_size) for k, v in mb.items()}
    # Both take the compact path: fewer logit positions than tokens, per row and per sequence shard.
    assert sharded.length_shards == cp_size and plain.slots_for(mb) < length
    assert sharded.slots_for(lb) < length // cp_size
    got_g, got_m = sharded.functions_for(sharded.slots_for(lb))[1](params, lb, cp.to_load_balanced(old, cp_size),
                                                                   cp.to_load_balanced(old, cp_size), denominator,
                                                                   np.bool_(False))
    for key in want_m:
        np.testing.assert_allclose(float(got_m[key]), float(want_m[key]), rtol=1e-5, atol=1e-6, err_msg=key)
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(want_g), jax.tree_util.tree_leaves(got_g)):
        want, got = np.asarray(want), np.asarray(got)
        scale = max(float(np.abs(want).max()), 1e-8)
        assert float(np.abs(got - want).max()) / scale < 1e-4, jax.tree_util.keystr(path)
