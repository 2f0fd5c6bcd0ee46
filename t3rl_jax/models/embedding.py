"""Token embedding lookup, plain and mesh-partitioned.

`take_embedding` is the single-device lookup. Under FSDP the table [vocab, embed] is sharded on
its `embed` dimension while activations [batch, length, embed] are sharded on batch / length; left
to GSPMD, the move from one layout to the other is a 2-D reshard XLA cannot express as one
collective, so it replicates the looked-up activations of the whole micro-batch on every device
("involuntary full rematerialization"), forward and backward. `make_sharded_embedding_lookup`
spells the move out under `shard_map`: gather the token ids of the devices that share an embed
shard, look them up in the local table slice, then one all-to-all per embed mesh axis hands every
device the full-width rows of its own tokens. Nothing bigger than the output activation exists,
and the table's gradient is a scatter-add into the local shard (no [vocab, embed] buffer).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from t3rl_jax import sharding as sh


def take_embedding(table, tokens, compute_dtype):
    """Rows of `table` [vocab, embed] for integer `tokens` [...], cast to `compute_dtype`."""
    # Gather in the table's dtype and cast after: the gradient's scatter-add then accumulates in the
    # parameter dtype, not in a low-precision compute dtype.
    return jnp.take(table, tokens, axis=0).astype(compute_dtype)


def make_sharded_embedding_lookup(mesh: Mesh, rules=sh.LOGICAL_AXIS_RULES) -> Callable:
    """`lookup(table, tokens, compute_dtype)` -> [batch, length, embed] with the activation sharding.

    The table must carry the sharding the rules give `("vocab", "embed")` (the parameter's own) and
    the tokens the `("batch", "length")` sharding. A vocabulary sharded over mesh axes is handled by
    masking out-of-shard ids and summing over those axes. Layouts the explicit path does not cover
    (an activation `embed` dimension that is itself sharded, or the vocabulary sharded over an axis
    that also shards the tokens) raise a ValueError naming the axes.
    """
    table_spec = sh.logical_to_spec(("vocab", "embed"), rules, mesh=mesh)
    act_spec = sh.logical_to_spec(("batch", "length", "embed"), rules, mesh=mesh)
    vocab_axes, embed_axes = sh.spec_axes(table_spec[0]), sh.spec_axes(table_spec[1])
    batch_axes, length_axes = sh.spec_axes(act_spec[0]), sh.spec_axes(act_spec[1])
    if sh.spec_axes(act_spec[2]):
        raise ValueError(f"sharded embedding lookup: activations shard their embed dimension over "
                         f"{sh.spec_axes(act_spec[2])}; only a whole embed dimension is supported")
    clash = set(vocab_axes) & (set(batch_axes) | set(length_axes) | set(embed_axes))
    if clash:
        raise ValueError(f"sharded embedding lookup: mesh axes {sorted(clash)} shard the vocabulary and also the "
                         f"tokens or the embed dimension")
    token_dim = {a: 0 for a in batch_axes}
    token_dim.update({a: 1 for a in length_axes})

    def local(table, tokens, compute_dtype):
        # Every device of an embed group looks up the group's tokens in its slice of the embed width.
        for axis in embed_axes:
            if axis in token_dim:
                tokens = jax.lax.all_gather(tokens, axis, axis=token_dim[axis], tiled=True)
        if vocab_axes:
            rows = table.shape[0]
            ids = tokens - jax.lax.axis_index(vocab_axes) * rows
            inside = (ids >= 0) & (ids < rows)
            x = take_embedding(table, jnp.where(inside, ids, 0), compute_dtype)
            x = jax.lax.psum(jnp.where(inside[..., None], x, jnp.zeros((), x.dtype)), vocab_axes)
        else:
            x = take_embedding(table, tokens, compute_dtype)
        # Undo the gathers innermost first: each all-to-all returns one axis's token split and
        # concatenates that axis's embed slices, which are the innermost of the embed sharding.
        for axis in reversed(embed_axes):
            if axis in token_dim:
                x = jax.lax.all_to_all(x, axis, split_axis=token_dim[axis], concat_axis=2, tiled=True)
            else:
                x = jax.lax.all_gather(x, axis, axis=2, tiled=True)
        return x

    token_spec = PartitionSpec(act_spec[0], act_spec[1])
    out_spec = PartitionSpec(act_spec[0], act_spec[1], None)

    def lookup(table, tokens, compute_dtype):
        if table.ndim != 2 or tokens.ndim != 2:
            raise ValueError(f"sharded embedding lookup needs table [vocab, embed] and tokens [batch, length], got "
                             f"shapes {table.shape} and {tokens.shape}")
        body = lambda t, ids: local(t, ids, jnp.dtype(compute_dtype))  # noqa: E731
        return jax.shard_map(body, mesh=mesh, in_specs=(table_spec, token_spec), out_specs=out_spec)(table, tokens)

    return lookup
