"""Token log-probs and entropy from final hidden states, with the output projection split over the vocabulary.

Under FSDP the output weight [embed, vocab] is sharded on `embed` and the hidden states on tokens. Left to GSPMD,
the logits einsum all-gathers the whole weight on every device and its backward builds a full [vocab, embed]
float32 partial gradient per device before reducing it: buffers the size of the table that no amount of context
parallelism shrinks. Here the weight is resharded once to [embed, vocab / G] (an all-to-all over the G devices that
shard it), every device of the group gathers the group's tokens of one chunk (a few MB of activations), computes the
logits of its vocabulary slice, and the log-softmax statistics are combined across the group (Megatron-style
vocab-parallel cross-entropy). The backward is written out (`custom_vjp`): the weight's gradient is local and
exact (each device sees all the group's tokens for its slice), the hidden states' gradient is summed and scattered
back to the owning devices.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from t3rl_jax.sharding import spec_axes


def _spec_axes(spec: PartitionSpec, dim: int) -> tuple[str, ...]:
    return spec_axes(spec[dim]) if dim < len(spec) else ()


class VocabParallelLogprobs:
    """`self(hidden [rows, n, E], weight [E, V], targets [rows, n], *, temperature, compute_dtype)` -> (logp, entropy).

    `weight_spec` is the output weight's own sharding in [E, V] layout (its mesh axes form the vocabulary group);
    `token_spec` is the [rows, n] sharding of hidden states and targets. Both results are [rows, n] float32 with
    `token_spec`, equal to log_softmax(logits / temperature)[target] and the entropy of that distribution.
    Pass the weight through `shard_weight` once, outside any loop over chunks, so the reshard is not repeated.
    """

    def __init__(self, mesh: Mesh, weight_spec: PartitionSpec, token_spec: PartitionSpec):
        self.mesh = mesh
        group = tuple(a for a in _spec_axes(weight_spec, 1) + _spec_axes(weight_spec, 0) if mesh.shape[a] > 1)
        token_axes = (_spec_axes(token_spec, 0), _spec_axes(token_spec, 1))
        # The [rows, n] divisibility the token sharding needs.
        self.token_multiple = tuple(math.prod(mesh.shape[a] for a in axes) for axes in token_axes)
        self.group = group  # the devices that split the vocabulary (empty: nothing to split)
        self.weight_sharding = NamedSharding(mesh, PartitionSpec(None, group or None))
        tok_spec = PartitionSpec(token_spec[0] if len(token_spec) > 0 else None,
                                 token_spec[1] if len(token_spec) > 1 else None)
        self._local = _local_logprobs(mesh, group, token_axes)
        self._specs = (PartitionSpec(tok_spec[0], tok_spec[1], None), self.weight_sharding.spec, tok_spec)

    def shard_weight(self, weight):
        """The weight in the group layout [E, V / G] (call once per step, outside the loop over chunks)."""
        return jax.lax.with_sharding_constraint(weight, self.weight_sharding)

    def __call__(self, hidden, weight, targets, *, temperature: float, compute_dtype):
        if hidden.ndim != 3 or targets.shape != hidden.shape[:2] or weight.ndim != 2 \
                or weight.shape[0] != hidden.shape[-1]:
            raise ValueError(f"vocab-parallel log-probs need hidden [rows, n, E], targets [rows, n], weight [E, V]; "
                             f"got {hidden.shape}, {targets.shape}, {weight.shape}")
        for dim, (size, multiple) in enumerate(zip(hidden.shape[:2], self.token_multiple)):
            if size % multiple:
                raise ValueError(f"vocab-parallel log-probs: hidden dimension {dim} of size {size} is not divisible "
                                 f"by its {multiple} token shards")
        h_spec, w_spec, t_spec = self._specs
        local = lambda h, w, t: self._local(h, w, t, float(temperature))  # noqa: E731
        sharded = jax.shard_map(local, mesh=self.mesh, in_specs=(h_spec, w_spec, t_spec), out_specs=(t_spec, t_spec))
        return sharded(hidden.astype(compute_dtype), weight, targets.astype(jnp.int32))


def _local_logprobs(mesh: Mesh, group: tuple[str, ...], token_axes):
    """The per-device computation (inside shard_map) with its hand-written backward."""
    token_dim = {a: dim for dim, axes in enumerate(token_axes) for a in axes}
    gathered = tuple(a for a in group if a in token_dim)        # group axes that also split the tokens
    replicated = tuple(a for a in group if a not in token_dim)  # group axes the tokens are copied over
    independent = tuple(a for a in token_dim if a not in group)  # token splits that share one weight slice

    def gather(x):
        for axis in gathered:
            x = jax.lax.all_gather(x, axis, axis=token_dim[axis], tiled=True)
        return x

    def own(x):
        """This device's tokens of a group-gathered [R, C] array (inverse of `gather`)."""
        for axis in reversed(gathered):
            dim = token_dim[axis]
            size = x.shape[dim] // mesh.shape[axis]
            x = jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(axis) * size, size, axis=dim)
        return x

    def logits_of(h_g, w, temperature):
        cdt = h_g.dtype
        return jnp.einsum("rce,ev->rcv", h_g, w.astype(cdt), preferred_element_type=jnp.float32) / temperature

    def local_ids(t_g, width):
        ids = t_g - (jax.lax.axis_index(group) * width if group else 0)
        return ids, (ids >= 0) & (ids < width)

    def stats(h, w, t, temperature):
        h_g, t_g = gather(h), gather(t)
        logits = logits_of(h_g, w, temperature)
        m = jnp.max(logits, axis=-1)
        if group:
            m = jax.lax.pmax(m, group)
        e = jnp.exp(logits - m[..., None])
        s, z = jnp.sum(e, axis=-1), jnp.sum(e * logits, axis=-1)
        ids, inside = local_ids(t_g, logits.shape[-1])
        picked = jnp.take_along_axis(logits, jnp.where(inside, ids, 0)[..., None], axis=-1)[..., 0]
        picked = jnp.where(inside, picked, 0.0)
        if group:
            s, z, picked = (jax.lax.psum(x, group) for x in (s, z, picked))
        lse = m + jnp.log(s)
        return picked - lse, lse - z / s, lse

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
    def local(h, w, t, temperature):
        logp, ent, _ = stats(h, w, t, temperature)
        return own(logp), own(ent)

    def fwd(h, w, t, temperature):
        logp, ent, lse = stats(h, w, t, temperature)
        return (own(logp), own(ent)), (h, w, t, lse, ent)

    def bwd(temperature, residuals, cotangents):
        """d logp / d l_j = [j == target] - p_j;  d H / d l_j = p_j (lse - H - l_j); l = logits / temperature."""
        h, w, t, lse, ent = residuals
        g_logp, g_ent = (gather(c.astype(jnp.float32))[..., None] for c in cotangents)
        h_g, t_g = gather(h), gather(t)
        logits = logits_of(h_g, w, temperature)
        p = jnp.exp(logits - lse[..., None])
        ids, inside = local_ids(t_g, logits.shape[-1])
        is_target = (jnp.arange(logits.shape[-1]) == ids[..., None]) & inside[..., None]
        d_logits = (g_logp * (is_target - p) + g_ent * p * (lse[..., None] - ent[..., None] - logits)) / temperature
        d_logits = d_logits.astype(h.dtype)
        dh = jnp.einsum("rcv,ev->rce", d_logits, w.astype(h.dtype), preferred_element_type=jnp.float32)
        if replicated:
            dh = jax.lax.psum(dh, replicated)
        for axis in reversed(gathered):
            dh = jax.lax.psum_scatter(dh, axis, scatter_dimension=token_dim[axis], tiled=True)
        dw = jnp.einsum("rce,rcv->ev", h_g, d_logits, preferred_element_type=jnp.float32)
        if independent:
            dw = jax.lax.psum(dw, independent)
        return dh.astype(h.dtype), dw.astype(w.dtype), None

    local.defvjp(fwd, bwd)
    return local
