"""Mesh-partitioned embedding lookup: equal to a plain take (values and table gradient) on every mesh shape, and
compiled without a replicated copy of the table or of the looked-up activations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from t3rl_jax import sharding as sh
from t3rl_jax.models.embedding import make_sharded_embedding_lookup, take_embedding

VOCAB, EMBED, B, T = 64, 32, 8, 16
# (data, fsdp, tensor, sequence), weights also over sequence?, also over data?
CASES = [((1, 1, 1, 8), True, False), ((1, 2, 1, 4), True, False), ((1, 2, 1, 4), False, False),
         ((2, 2, 2, 1), True, False), ((1, 1, 2, 4), True, False), ((2, 1, 1, 4), True, False),
         ((2, 2, 1, 2), True, True), ((1, 8, 1, 1), False, False)]


def _ids(case):
    shape, over_seq, over_data = case
    return "x".join(map(str, shape)) + ("_w-seq" if over_seq else "") + ("_w-data" if over_data else "")


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((VOCAB, EMBED)).astype(np.float32)
    tokens = rng.integers(0, VOCAB, (B, T)).astype(np.int32)
    weights = rng.standard_normal((B, T, EMBED)).astype(np.float32)
    return table, tokens, weights


def _value_and_grad(lookup, table, tokens, weights, compute_dtype, shardings=None):
    def loss(table):
        x = lookup(table, tokens, compute_dtype)
        return jnp.sum(x.astype(jnp.float32) * weights), x

    fn = jax.value_and_grad(loss, has_aux=True)
    if shardings is None:
        (_, x), g = jax.jit(fn)(table)
    else:
        table_sh, act_sh = shardings
        (_, x), g = jax.jit(fn, in_shardings=(table_sh,), out_shardings=((None, act_sh), table_sh))(table)
    return np.asarray(x.astype(jnp.float32)), np.asarray(g)


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("compute_dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_sharded_lookup_equals_plain_take(inputs, case, compute_dtype):
    table, tokens, weights = inputs
    shape, over_seq, over_data = case
    mesh = sh.make_mesh(dict(zip(sh.MESH_AXES, shape)))
    rules = sh.logical_axis_rules(fsdp_over_data=over_data, fsdp_over_sequence=over_seq)
    table_sh = NamedSharding(mesh, sh.logical_to_spec(("vocab", "embed"), rules, mesh=mesh))
    act_sh = NamedSharding(mesh, sh.logical_to_spec(("batch", "length", "embed"), rules, mesh=mesh))
    lookup = make_sharded_embedding_lookup(mesh, rules)
    want_x, want_g = _value_and_grad(take_embedding, table, tokens, weights, compute_dtype)
    got_x, got_g = _value_and_grad(lookup, table, tokens, weights, compute_dtype, (table_sh, act_sh))
    np.testing.assert_array_equal(got_x, want_x)  # a lookup moves values, it computes nothing
    np.testing.assert_allclose(got_g, want_g, rtol=1e-6, atol=1e-6)
    # Every row that some token hit has a non-zero gradient; the others none.
    hit = np.zeros(VOCAB, bool)
    hit[tokens.ravel()] = True
    assert np.all(np.abs(got_g[hit]).sum(-1) > 0) and np.all(got_g[~hit] == 0)


def test_unsupported_layout_is_named():
    mesh = sh.make_mesh({"data": 1, "fsdp": 4, "tensor": 2, "sequence": 1})
    rules = tuple((name, ("fsdp",) if name == "vocab" else axes) for name, axes in sh.LOGICAL_AXIS_RULES)
    with pytest.raises(ValueError, match="shard the vocabulary and also"):
        make_sharded_embedding_lookup(mesh, rules)
    lookup = make_sharded_embedding_lookup(mesh)
    with pytest.raises(ValueError, match=r"tokens \[batch, length\]"):
        lookup(jnp.zeros((VOCAB, EMBED)), jnp.zeros((B,), jnp.int32), jnp.float32)


def _compiled_temp_bytes(lookup, mesh, rules, vocab, embed, batch, length):
    table_sh = NamedSharding(mesh, sh.logical_to_spec(("vocab", "embed"), rules, mesh=mesh))
    act_sh = NamedSharding(mesh, sh.logical_to_spec(("batch", "length", "embed"), rules, mesh=mesh))
    tok_sh = NamedSharding(mesh, sh.logical_to_spec(("batch", "length"), rules, mesh=mesh))

    def loss(table, tokens, weights):
        return jnp.sum(lookup(table, tokens, jnp.bfloat16).astype(jnp.float32) * weights)

    fn = jax.jit(jax.grad(loss), in_shardings=(table_sh, tok_sh, act_sh), out_shardings=table_sh)
    args = (jax.ShapeDtypeStruct((vocab, embed), jnp.float32), jax.ShapeDtypeStruct((batch, length), jnp.int32),
            jax.ShapeDtypeStruct((batch, length, embed), jnp.float32))
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_compiled_lookup_holds_no_replicated_table_or_activations():
    """Stage 2's layout (weights over fsdp x sequence, CP 4): the per-device temporaries of forward + backward
    stay below one device's share of the looked-up activations plus its table shard, several times less than
    one replicated table, where GSPMD's own partitioning of the same take needs more than a table."""
    mesh = sh.make_mesh({"data": 1, "fsdp": 2, "tensor": 1, "sequence": 4})
    rules = sh.logical_axis_rules(fsdp_over_sequence=True)
    vocab, embed, batch, length = 4096, 512, 2, 2048
    table_bytes = vocab * embed * 4
    activation_share = batch * length * embed * 4 // 8

    def gspmd(table, tokens, compute_dtype):
        return jax.lax.with_sharding_constraint(
            take_embedding(table, tokens, compute_dtype),
            NamedSharding(mesh, sh.logical_to_spec(("batch", "length", "embed"), rules, mesh=mesh)))

    explicit = _compiled_temp_bytes(make_sharded_embedding_lookup(mesh, rules), mesh, rules, vocab, embed, batch,
                                    length)
    implicit = _compiled_temp_bytes(gspmd, mesh, rules, vocab, embed, batch, length)
    assert explicit <= 4 * activation_share + table_bytes // 8, (explicit, activation_share, table_bytes)
    assert explicit * 3 < table_bytes
    assert implicit > table_bytes, "GSPMD partitions this take well now: the explicit lookup may be unnecessary"
