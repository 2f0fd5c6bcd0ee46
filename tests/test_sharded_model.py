"""Whole-model parity: sharded (FSDP / tensor / context parallel) runs equal the single-device run."""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t3rl_jax import sharding as sh
from t3rl_jax.models import context_parallel as cp
from t3rl_jax.models.embedding import make_sharded_embedding_lookup
from t3rl_jax.models.model_config import TINY
from t3rl_jax.models.qwen3 import Qwen3

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import fit_check  # noqa: E402

CONFIG = dataclasses.replace(TINY, vocab_size=256, num_layers=2)
MESH_SHAPES = [(1, 1, 1, 8), (1, 2, 1, 4), (2, 2, 2, 1), (1, 1, 2, 4), (2, 1, 1, 4)]
B, T = 4, 32


def packed_padded_tokens(seed=0):
    """Rows: two packed sequences + right padding; left padding; one full row; three packed sequences."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    for row, spans in enumerate([[(1, 0, 20), (2, 20, 29)], [(1, 5, T)], [(1, 0, T)],
                                 [(1, 0, 7), (2, 7, 30), (3, 30, T)]]):
        for s, lo, hi in spans:
            seg[row, lo:hi] = s
            pos[row, lo:hi] = np.arange(hi - lo)
    tokens = np.where(seg > 0, rng.integers(1, CONFIG.vocab_size, (B, T)), 0).astype(np.int32)
    return tokens, pos, seg


def forward_and_grads(model_kwargs, params, batch, weights, *, shardings=None, cp_size=1):
    """Logits (original token order) and d(sum(logits * weights))/d(params), jitted."""
    graphdef, _ = nnx.split(Qwen3(CONFIG, rngs=nnx.Rngs(0), **model_kwargs))
    lb = lambda x: cp.to_load_balanced(x, cp_size)
    batch = {k: lb(v) for k, v in batch.items()}
    weights = lb(weights)

    def fn(params, batch, weights):
        def loss(params):
            logits = nnx.merge(graphdef, params)(batch["tokens"], batch["positions"], batch["segment_ids"])
            return jnp.sum(logits * weights), logits

        (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return logits, grads

    if shardings is None:
        logits, grads = jax.jit(fn)(params, batch, weights)
    else:
        param_sh, batch_sh, weight_sh = shardings
        logits, grads = jax.jit(fn, in_shardings=(param_sh, batch_sh, weight_sh),
                                out_shardings=(weight_sh, param_sh))(params, batch, weights)
    return np.asarray(cp.from_load_balanced(logits, cp_size)), grads


def max_relative_error(got, want):
    got, want = np.asarray(got), np.asarray(want)
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def reference():
    params = nnx.state(Qwen3(CONFIG, rngs=nnx.Rngs(0)))
    tokens, pos, seg = packed_padded_tokens()
    batch = {"tokens": tokens, "positions": pos, "segment_ids": seg}
    weights = np.random.default_rng(1).standard_normal((B, T, CONFIG.vocab_size)).astype(np.float32)
    logits, grads = forward_and_grads({}, params, batch, weights)
    return params, batch, weights, logits, grads


# Weights sharded over fsdp x sequence (what fit_check uses) on every mesh, fsdp only on one.
CASES = [(shape, True) for shape in MESH_SHAPES] + [((1, 2, 1, 4), False)]


@pytest.mark.parametrize("shape,fsdp_over_sequence", CASES,
                         ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else f"weights_over_seq={c}")
def test_sharded_forward_and_grads_equal_single_device(reference, shape, fsdp_over_sequence):
    params, batch, weights, want_logits, want_grads = reference
    mesh = sh.make_mesh(dict(zip(sh.MESH_AXES, shape)))
    rules = sh.logical_axis_rules(fsdp_over_sequence=fsdp_over_sequence)
    model_kwargs = dict(attention_fn=cp.make_context_parallel_attention(mesh, rules, block_size=8),
                        activation_constraint=sh.make_activation_constraint(mesh, rules),
                        embedding_fn=make_sharded_embedding_lookup(mesh, rules))  # as the trainer builds it
    param_sh = sh.state_shardings(params, mesh, rules)
    batch_sh = sh.batch_shardings(batch, mesh, rules)
    weight_sh = jax.sharding.NamedSharding(mesh, sh.logical_to_spec(("batch", "length", "vocab"), rules, mesh=mesh))
    logits, grads = forward_and_grads(model_kwargs, params, batch, weights, shardings=(param_sh, batch_sh, weight_sh),
                                      cp_size=shape[3])
    errors = [max_relative_error(logits, want_logits)]
    assert errors[0] <= 1e-5
    flat_got = jax.tree_util.tree_leaves_with_path(grads)
    flat_want = jax.tree.leaves(want_grads)
    assert len(flat_got) == len(flat_want)
    for (path, g), w in zip(flat_got, flat_want):
        errors.append(max_relative_error(g, w))
        assert errors[-1] <= 1e-5, jax.tree_util.keystr(path)
    print(f"max relative error {max(errors):.2e}")
    # Weights really are sharded the way the rules say (q_proj: [layers, embed, heads, head_dim]).
    q_spec = grads["layers"]["q_proj"].get_value().sharding.spec
    fsdp_axes = tuple(a for a in ("fsdp",) + ("sequence",) * fsdp_over_sequence if mesh.shape[a] > 1)
    assert q_spec[1] == (fsdp_axes[0] if len(fsdp_axes) == 1 else fsdp_axes or None)
    assert q_spec[2] == ("tensor" if mesh.shape["tensor"] > 1 else None)


TINY_FIT = ["--config=tiny", "--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.sequence=4",
            "--config.train.max_seq_len=256", "--config.train.micro_batch_size=2",
            "--config.rollout.max_context_tokens=256", "--config.rollout.max_response_tokens=128",
            "--config.rollout.max_prefill_length=256"]


def test_fit_check_compiles_the_real_train_step(capsys):
    assert fit_check.main(TINY_FIT) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("peak_per_device_bytes=")
    total = int(out[-1].split("=")[1])
    grad_temp_gib = float(next(line for line in out if line.split()[:1] == ["grad_first"]).split()[4])
    assert 0 < grad_temp_gib * 2**30 < total
    assert any("'sequence': 4" in line for line in out)


def test_fit_check_rejects_bad_mesh_before_compiling():
    with pytest.raises(ValueError, match=r"max_seq_len: must be divisible by 2 \* mesh.sequence = 8 \(got 100\)"):
        fit_check.main([a for a in TINY_FIT if "max_seq_len" not in a and "max_context" not in a
                        and "max_response" not in a and "max_prefill" not in a]
                       + ["--config.train.max_seq_len=100", "--config.rollout.max_context_tokens=96",
                          "--config.rollout.max_response_tokens=64", "--config.rollout.max_prefill_length=64"])
    with pytest.raises(ValueError, match=r"query heads 4 are not divisible by the tensor axis size 8"):
        fit_check.main(["--config=tiny", "--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.tensor=8"])
