"""Qwen3 NNX model: logits parity with transformers, scan/remat/dtype options, hooks, axes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from helpers_hf import hf_logits, make_hf_model, padded_batch, save_hf_dir
from t3rl_jax.models import attention, hf_io
from t3rl_jax.models.model_config import TINY, Qwen3Config
from t3rl_jax.models.qwen3 import Qwen3

SMALL = dataclasses.replace(TINY, vocab_size=512, num_layers=2)

PARITY_CONFIGS = {
    "tied_gqa2_theta1e6": dict(tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6),
    "untied_gqa1_headdim12": dict(tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=4,
                                  head_dim=12, rope_theta=1e6),
    "tied_gqa4_headdim24_theta5e6": dict(tie_word_embeddings=True, num_attention_heads=8, num_key_value_heads=2,
                                         head_dim=24, rope_theta=5e6, num_hidden_layers=3),
    "untied_yarn": dict(tie_word_embeddings=False, rope_theta=1e6,
                        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                         "rope_theta": 1e6}),
}


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_logits_match_transformers_with_left_and_right_padding(name, tmp_path):
    overrides = dict(PARITY_CONFIGS[name])
    hf_model = make_hf_model(seed=len(name), **overrides)
    ours = hf_io.load_hf(save_hf_dir(hf_model, tmp_path))
    rng = np.random.default_rng(0)
    # Rows: right-padded, left-padded, full; positions run far enough to exercise the RoPE tables.
    tokens, mask, positions, segments = padded_batch(rng, 512, [13, 9, 24], 24, [False, True, False])
    positions = positions + np.array([[0], [0], [90]], np.int32)  # a row starting mid-sequence
    want = hf_logits(hf_model, tokens, mask, positions)
    got = np.asarray(jax.jit(ours)(tokens, positions, segments))
    valid = mask.astype(bool)
    assert np.abs(got - want)[valid].max() <= 1e-4
    assert np.isfinite(got).all()  # padding rows see no key: zeros, never NaN


def test_packed_rows_equal_separate_sequences():
    model = Qwen3(SMALL, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(1)
    a, b = rng.integers(1, 512, 7), rng.integers(1, 512, 5)
    packed = np.concatenate([a, b, [0, 0]])[None].astype(np.int32)
    seg = np.array([[1] * 7 + [2] * 5 + [0, 0]], np.int32)
    pos = np.array([list(range(7)) + list(range(5)) + [0, 0]], np.int32)
    run = jax.jit(model)
    got = np.asarray(run(packed, pos, seg))
    alone_a = np.asarray(run(a[None].astype(np.int32), np.arange(7)[None], np.ones((1, 7), np.int32)))
    alone_b = np.asarray(run(b[None].astype(np.int32), np.arange(5)[None], np.ones((1, 5), np.int32)))
    np.testing.assert_allclose(got[0, :7], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(got[0, 7:12], alone_b[0], atol=1e-5)


def test_permuted_tokens_give_permuted_logits():
    # The context-parallel path reorders tokens; positions drive RoPE, never the token order.
    model = Qwen3(SMALL, rngs=nnx.Rngs(2))
    tokens = np.random.default_rng(2).integers(1, 512, (1, 8)).astype(np.int32)
    pos, seg = np.arange(8, dtype=np.int32)[None], np.ones((1, 8), np.int32)
    perm = np.array([0, 7, 1, 6, 2, 5, 3, 4])
    base = np.asarray(model(tokens, pos, seg))
    permuted = np.asarray(model(tokens[:, perm], pos[:, perm], seg[:, perm]))
    np.testing.assert_allclose(permuted, base[:, perm], atol=1e-5)


def _batch(seed=3, b=2, t=10, vocab=512):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (b, t)).astype(np.int32)
    seg = np.ones((b, t), np.int32)
    seg[1, :3] = 0
    pos = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
    return tokens, pos, seg


def test_scanned_and_unscanned_layers_agree():
    tokens, pos, seg = _batch()
    scanned = Qwen3(SMALL, rngs=nnx.Rngs(4), scan_layers=True)
    looped = Qwen3(SMALL, rngs=nnx.Rngs(4), scan_layers=False)
    np.testing.assert_allclose(np.asarray(looped(tokens, pos, seg)), np.asarray(scanned(tokens, pos, seg)),
                               rtol=1e-5, atol=1e-5)


def _grads(model, tokens, pos, seg):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def loss_fn(params):
        m = nnx.merge(graphdef, params, rest)
        logp = jax.nn.log_softmax(m(tokens, pos, seg)[:, :-1])
        picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        return -(picked * seg[:, 1:]).sum()

    return jax.grad(loss_fn)(params)


@pytest.mark.slow  # three grad compiles: ~10 s alone, ~20 s on a busy 2-core machine
def test_remat_does_not_change_gradients():
    # One reference without remat; scanned + dots_saveable and looped + full recompute must match it.
    tokens, pos, seg = _batch(5)
    reference = _grads(Qwen3(SMALL, rngs=nnx.Rngs(6)), tokens, pos, seg)
    for scan, policy in ((True, "dots_saveable"), (False, "full")):
        got = _grads(Qwen3(SMALL, rngs=nnx.Rngs(6), scan_layers=scan, remat_policy=policy), tokens, pos, seg)
        for r, g in zip(jax.tree.leaves(reference), jax.tree.leaves(got)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(reference))


def test_unknown_remat_policy_is_rejected():
    with pytest.raises(ValueError, match="remat_policy='sometimes'"):
        Qwen3(SMALL, rngs=nnx.Rngs(0), remat_policy="sometimes")


def test_dtype_policy_bf16_params_and_compute_stay_close_to_f32():
    tokens, pos, seg = _batch(7)
    f32 = Qwen3(SMALL, rngs=nnx.Rngs(8))
    bf16 = Qwen3(SMALL, rngs=nnx.Rngs(8), param_dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    want, got = np.asarray(f32(tokens, pos, seg)), np.asarray(bf16(tokens, pos, seg))
    assert got.dtype == np.float32  # logits always float32 for log-prob precision
    valid = seg.astype(bool)
    assert np.abs(got - want)[valid].max() < 0.05 * np.abs(want).max()
    f32_params_bf16_compute = Qwen3(SMALL, rngs=nnx.Rngs(8), compute_dtype=jnp.bfloat16)
    assert jax.tree.leaves(nnx.state(f32_params_bf16_compute, nnx.Param))[0].dtype == jnp.float32
    assert np.isfinite(np.asarray(f32_params_bf16_compute(tokens, pos, seg))).all()


def test_hidden_states_and_chunked_logits_match_full_logits():
    model = Qwen3(dataclasses.replace(SMALL, tie_word_embeddings=False), rngs=nnx.Rngs(9))
    tokens, pos, seg = _batch(9)
    hidden = model.hidden_states(tokens, pos, seg)
    assert hidden.shape == (2, 10, SMALL.hidden_size)
    chunks = [model.logits_from_hidden(hidden[:, i:i + 4]) for i in range(0, 10, 4)]
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), np.asarray(model(tokens, pos, seg)), atol=1e-6)
    w = np.asarray(model.output_embedding())
    assert w.shape == (SMALL.hidden_size, SMALL.vocab_size)
    np.testing.assert_allclose(np.asarray(hidden) @ w, np.asarray(model(tokens, pos, seg)), atol=1e-4)


def test_hooks_receive_attention_and_logical_activation_axes():
    seen_axes, attention_calls = set(), []

    def constraint(x, axes):
        assert len(axes) == x.ndim, (axes, x.shape)
        seen_axes.add(tuple(axes))
        return x

    def attention_fn(q, k, v, **kw):
        attention_calls.append((q.shape, k.shape))
        return attention.attend(q, k, v, **kw)

    model = Qwen3(SMALL, rngs=nnx.Rngs(10), attention_fn=attention_fn, activation_constraint=constraint,
                  scan_layers=False)
    tokens, pos, seg = _batch(10)
    model(tokens, pos, seg)
    assert len(attention_calls) == SMALL.num_layers
    assert attention_calls[0] == ((2, 10, 4, 16), (2, 10, 2, 16))
    assert {("batch", "length", "embed"), ("batch", "length", "heads", "head_dim"),
            ("batch", "length", "kv_heads", "head_dim"), ("batch", "length", "mlp"),
            ("batch", "length", "vocab")} <= seen_axes


def _unbox(x):
    return x.get_value() if isinstance(x, nnx.Variable) else x


def test_params_carry_logical_axis_names_only():
    model = Qwen3(dataclasses.replace(SMALL, tie_word_embeddings=False), rngs=nnx.Rngs(0))
    specs = nnx.to_flat_state(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
    allowed = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers", "norm"}
    by_path = {path: tuple(_unbox(var)) for path, var in specs}
    assert by_path[("embed",)] == ("vocab", "embed")
    assert by_path[("lm_head",)] == ("embed", "vocab")
    assert by_path[("layers", "q_proj")] == ("layers", "embed", "heads", "head_dim")
    assert by_path[("layers", "down_proj")] == ("layers", "mlp", "embed")
    for path, spec in by_path.items():
        assert set(spec) <= allowed, path
        if path[0] == "layers":
            assert spec[0] == "layers"
    # A logical->mesh rule set turns them into mesh PartitionSpecs without touching the model.
    from flax.core import spmd

    rules = [("heads", "model"), ("kv_heads", "model"), ("mlp", "model"), ("vocab", "model"), ("embed", None),
             ("layers", None), ("head_dim", None), ("norm", None)]
    with spmd.logical_axis_rules(rules):
        spec = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    assert tuple(_unbox(spec["layers"]["q_proj"])) == (None, None, "model", None)


def test_bad_inputs_are_named():
    model = Qwen3(SMALL, rngs=nnx.Rngs(0))
    tokens = np.zeros((2, 5), np.int32)
    with pytest.raises(ValueError, match="positions shape"):
        model(tokens, np.zeros((2, 4), np.int32), np.ones((2, 5), np.int32))
    with pytest.raises(ValueError, match="tokens must be"):
        model(tokens[0], tokens[0], tokens[0])
    with pytest.raises(ValueError, match="num_kv_heads"):
        dataclasses.replace(SMALL, num_heads=6, num_kv_heads=4)


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048, "beta_fast": 16.0,
     "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 512},
])
def test_rope_frequencies_match_transformers(rope):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = transformers.Qwen3Config(head_dim=64, max_position_embeddings=8192,
                                      rope_parameters={**rope, "rope_theta": 5e6})
    want_freq, want_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_cfg)
    ours = Qwen3Config.from_hf_dict({**hf_cfg.to_dict(), "hidden_size": 64, "num_attention_heads": 1,
                                     "num_key_value_heads": 1, "vocab_size": 8, "num_hidden_layers": 1})
    got_freq, got_scale = ours.rope_frequencies()
    np.testing.assert_allclose(got_freq, want_freq.numpy(), rtol=1e-6)
    assert got_scale == pytest.approx(want_scale)


def test_default_rope_matches_transformers():
    import transformers

    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    hf_cfg = transformers.Qwen3Config(head_dim=128, rope_theta=5e6)
    rotary = Qwen3RotaryEmbedding(hf_cfg)
    ours = Qwen3Config.from_hf_dict({**hf_cfg.to_dict(), "hidden_size": 128, "num_attention_heads": 1,
                                     "num_key_value_heads": 1, "vocab_size": 8, "num_hidden_layers": 1})
    np.testing.assert_allclose(ours.rope_frequencies()[0], rotary.inv_freq.numpy(), rtol=1e-6)
    positions = [[0, 1, 17, 1000, 4095]]
    cos, sin = rotary(torch.zeros(1, 5, 128), torch.tensor(positions))
    from t3rl_jax.models.qwen3 import rope_tables

    our_cos, our_sin = rope_tables(jnp.array(positions), *ours.rope_frequencies(), jnp.float32)
    np.testing.assert_allclose(np.asarray(our_cos), cos.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(our_sin), sin.numpy(), atol=1e-4)
