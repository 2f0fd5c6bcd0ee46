"""Qwen3 decoder in Flax NNX.

Layer parameters are stacked on a leading `layers` axis, so one parameter layout serves both
`jax.lax.scan` over layers (fast compiles) and a plain Python loop (`scan_layers=False`). With a KV cache the
layers are always unrolled: each layer owns its cache buffers (see `kv_cache.KVCache`).
Parameters carry logical axis names only (`out_sharding` metadata, read by
`nnx.get_partition_spec`); the mapping to mesh axes lives in the sharding layer, which can also
plug in an `activation_constraint(x, logical_axes)`, a different `attention_fn` and a mesh-aware `embedding_fn`.

Activations use the logical names `batch` and `length` besides the parameter names.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t3rl_jax.models import kv_cache as kvc
from t3rl_jax.models.attention import CACHE_QUERY_BLOCK, attend, attention_mask, cache_attention
from t3rl_jax.models.embedding import take_embedding
from t3rl_jax.models.model_config import Qwen3Config

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# name -> (shape builder, logical axes without the leading `layers`, init)
_LAYER_PARAMS = {
    "input_norm": (lambda c: (c.hidden_size,), ("norm",), "ones"),
    "q_proj": (lambda c: (c.hidden_size, c.num_heads, c.head_dim), ("embed", "heads", "head_dim"), "normal"),
    "k_proj": (lambda c: (c.hidden_size, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), "normal"),
    "v_proj": (lambda c: (c.hidden_size, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), "normal"),
    "q_norm": (lambda c: (c.head_dim,), ("norm",), "ones"),
    "k_norm": (lambda c: (c.head_dim,), ("norm",), "ones"),
    "o_proj": (lambda c: (c.num_heads, c.head_dim, c.hidden_size), ("heads", "head_dim", "embed"), "normal"),
    "post_attention_norm": (lambda c: (c.hidden_size,), ("norm",), "ones"),
    "gate_proj": (lambda c: (c.hidden_size, c.intermediate_size), ("embed", "mlp"), "normal"),
    "up_proj": (lambda c: (c.hidden_size, c.intermediate_size), ("embed", "mlp"), "normal"),
    "down_proj": (lambda c: (c.intermediate_size, c.hidden_size), ("mlp", "embed"), "normal"),
}
LAYER_PARAM_NAMES = tuple(_LAYER_PARAMS)
INIT_STDDEV = 0.02  # transformers' initializer_range for Qwen3


def no_constraint(x, logical_axes):
    del logical_axes
    return x


def _param(rngs: nnx.Rngs, shape, axes, init: str, dtype) -> nnx.Param:
    if init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = (INIT_STDDEV * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    # Placement happens later (jit out_shardings from nnx.get_partition_spec), so no mesh is needed here.
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def rms_norm(x, scale, eps: float):
    """RMSNorm in float32, result cast back to x's dtype before the scale (as transformers does)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


def rope_tables(positions, inv_freq: np.ndarray, scale: float, dtype):
    """cos / sin [B, T, head_dim] for arbitrary (possibly permuted) integer positions."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return (jnp.cos(angles) * scale).astype(dtype), (jnp.sin(angles) * scale).astype(dtype)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE on x [B, T, H, D] with cos/sin [B, T, D]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


@dataclasses.dataclass(frozen=True)
class _Runtime:
    """Static per-call settings threaded into the layer function."""

    eps: float
    compute_dtype: jnp.dtype
    attention_fn: Callable
    constrain: Callable


def decoder_layer(p: dict, x, cos, sin, positions, segment_ids, rt: _Runtime, cache=None):
    """One pre-norm Qwen3 block on x [B, T, E]. Returns (x, cache).

    With a cache (a `_LayerCache`), the new keys/values are scattered into this layer's buffers (only T slots
    written, in place) and the queries attend over the cache (`cache_attention`, the cache's own layout), masked
    by the cache's positions / segment ids.
    """
    cdt = rt.compute_dtype
    p = {k: v.astype(cdt) for k, v in p.items()}
    h = rms_norm(x, p["input_norm"], rt.eps)
    q = rms_norm(jnp.einsum("bte,ehd->bthd", h, p["q_proj"]), p["q_norm"], rt.eps)
    k = rms_norm(jnp.einsum("bte,ehd->bthd", h, p["k_proj"]), p["k_norm"], rt.eps)
    v = jnp.einsum("bte,ehd->bthd", h, p["v_proj"])
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q = rt.constrain(q, ("batch", "length", "heads", "head_dim"))
    k = rt.constrain(k, ("batch", "length", "kv_heads", "head_dim"))
    v = rt.constrain(v, ("batch", "length", "kv_heads", "head_dim"))
    if cache is None:
        attn = rt.attention_fn(q, k, v, q_positions=positions, kv_positions=positions,
                               q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
    else:
        cache = cache.write(k, v)
        k_seen, v_seen = cache.visible()
        attn = cache_attention(q, k_seen.astype(cdt), v_seen.astype(cdt), cache.mask, query_block=cache.query_block)
    x = x + jnp.einsum("bthd,hde->bte", attn.astype(cdt), p["o_proj"])
    h = rms_norm(x, p["post_attention_norm"], rt.eps)
    gate = rt.constrain(jnp.einsum("bte,em->btm", h, p["gate_proj"]), ("batch", "length", "mlp"))
    up = rt.constrain(jnp.einsum("bte,em->btm", h, p["up_proj"]), ("batch", "length", "mlp"))
    x = x + jnp.einsum("btm,me->bte", jax.nn.silu(gate) * up, p["down_proj"])
    return rt.constrain(x, ("batch", "length", "embed")), cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _LayerCache:
    """One layer's K/V buffers, where this call's tokens go, and which cached keys they may see."""

    k: jax.Array  # [B, Hkv, D, S]
    v: jax.Array  # [B, Hkv, S, D]
    write_idx: jax.Array  # [B, T] slots for the new tokens (S = dropped)
    mask: jax.Array  # [B, T, W] visibility of the first W cache slots, after this call's writes
    window: int = dataclasses.field(metadata=dict(static=True))
    query_block: int = dataclasses.field(default=CACHE_QUERY_BLOCK, metadata=dict(static=True))

    def write(self, k, v) -> "_LayerCache":
        # Per row (vmap): the scatter then has a batch dimension, which keeps it local to the devices holding
        # each slot; indexing rows by a global iota made the partitioner all-gather every slot's keys per layer.
        def put_k(buf, idx, new):  # buf [Hkv, D, S], new [T, Hkv, D]
            return buf.at[:, :, idx].set(new.transpose(1, 2, 0).astype(buf.dtype), mode="drop")

        def put_v(buf, idx, new):  # buf [Hkv, S, D]
            return buf.at[:, idx].set(new.transpose(1, 0, 2).astype(buf.dtype), mode="drop")

        return dataclasses.replace(self, k=jax.vmap(put_k)(self.k, self.write_idx, k),
                                   v=jax.vmap(put_v)(self.v, self.write_idx, v))

    def visible(self):
        if self.window == self.v.shape[2]:
            return self.k, self.v
        return self.k[..., :self.window], self.v[:, :, :self.window]


class DecoderStack(nnx.Module):
    """All decoder layers' parameters, each stacked on a leading `layers` axis."""

    def __init__(self, config: Qwen3Config, *, param_dtype, rngs: nnx.Rngs):
        for name, (shape_fn, axes, init) in _LAYER_PARAMS.items():
            shape = (config.num_layers, *shape_fn(config))
            setattr(self, name, _param(rngs, shape, ("layers", *axes), init, param_dtype))

    def arrays(self) -> dict:
        return {name: getattr(self, name)[...] for name in LAYER_PARAM_NAMES}

    def per_layer(self, dtype=None) -> list[dict]:
        """Each layer's parameters sliced out of the stacks, optionally cast (see `Qwen3.hidden_states`'
        `layer_params`)."""
        stacked = self.arrays()
        return [{k: v[i] if dtype is None else v[i].astype(dtype) for k, v in stacked.items()}
                for i in range(len(stacked["input_norm"]))]


class Qwen3(nnx.Module):
    """Qwen3 causal LM.

    `model(tokens, positions, segment_ids)` -> logits [B, T, V] (float32);
    `model(..., kv_cache=cache)` -> (logits, new_cache). Segment id 0 marks padding.
    """

    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 compute_dtype=jnp.float32, scan_layers: bool = True, remat_policy: str = "none",
                 attention_fn: Callable = attend, activation_constraint: Callable = no_constraint,
                 embedding_fn: Callable = take_embedding):
        if remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={remat_policy!r} unknown; choose one of {', '.join(REMAT_POLICIES)}")
        self.config = config
        self.compute_dtype = jnp.dtype(compute_dtype)
        self.scan_layers = scan_layers
        self.remat_policy = remat_policy
        self.attention_fn = attention_fn
        self.activation_constraint = activation_constraint
        self.embedding_fn = embedding_fn  # (table, tokens, compute_dtype) -> [B, T, E]
        e, v = config.hidden_size, config.vocab_size
        self.embed = _param(rngs, (v, e), ("vocab", "embed"), "normal", param_dtype)
        self.layers = DecoderStack(config, param_dtype=param_dtype, rngs=rngs)
        self.final_norm = _param(rngs, (e,), ("norm",), "ones", param_dtype)
        if not config.tie_word_embeddings:
            self.lm_head = _param(rngs, (e, v), ("embed", "vocab"), "normal", param_dtype)

    def __call__(self, tokens, positions, segment_ids, kv_cache: kvc.KVCache | None = None,
                 cache_window: int | None = None):
        out = self.hidden_states(tokens, positions, segment_ids, kv_cache, cache_window=cache_window)
        if kv_cache is None:
            return self.logits_from_hidden(out)
        hidden, new_cache = out
        return self.logits_from_hidden(hidden), new_cache

    def output_embedding(self):
        """LM head weight as [embed, vocab] in compute dtype (for chunked log-prob computation)."""
        if self.config.tie_word_embeddings:
            return self.embed[...].astype(self.compute_dtype).T
        return self.lm_head[...].astype(self.compute_dtype)

    def logits_from_hidden(self, hidden):
        """Final hidden states [..., E] -> float32 logits [..., V]; works on any chunk of tokens."""
        logits = jnp.einsum("...e,ev->...v", hidden.astype(self.compute_dtype), self.output_embedding(),
                            preferred_element_type=jnp.float32)
        axes = ("batch", "length", "vocab") if logits.ndim == 3 else (None,) * (logits.ndim - 1) + ("vocab",)
        return self.activation_constraint(logits, axes)

    def hidden_states(self, tokens, positions, segment_ids, kv_cache: kvc.KVCache | None = None, *,
                      cache_window: int | None = None, layer_params: list[dict] | None = None,
                      layer_cache_fn: Callable | None = None):
        """Final-normed hidden states [B, T, E]; with a cache returns (hidden, new_cache).

        `cache_window` (static) lets the new tokens attend over only the first `cache_window` cache slots: attention
        then costs the context actually held, not the cache's capacity. The caller guarantees every row's
        length after this call is <= cache_window.
        `layer_params` (cached path only): `self.layers.per_layer(compute_dtype)` computed once outside a decode
        loop. XLA does not hoist the per-layer weight slices (nor casts) out of a while loop, so without it every
        decode step copies every weight.
        `layer_cache_fn(i)` (instead of `kv_cache`): layer i's cache object, made by the caller (`decoder_layer`'s
        `write` / `visible` / `mask`); returns (hidden, [each layer's updated cache object]). Made when its layer
        runs, so whatever it gathers is live only around that layer.
        """
        cfg = self.config
        _check_inputs(tokens, positions, segment_ids)
        rt = _Runtime(eps=cfg.rms_norm_eps, compute_dtype=self.compute_dtype, attention_fn=self.attention_fn,
                      constrain=self.activation_constraint)
        x = self.embedding_fn(self.embed[...], tokens, self.compute_dtype)
        x = rt.constrain(x, ("batch", "length", "embed"))
        inv_freq, scale = cfg.rope_frequencies()
        cos, sin = rope_tables(positions, inv_freq, scale, self.compute_dtype)

        def layer(x, p, cache):
            return decoder_layer(p, x, cos, sin, positions, segment_ids, rt, cache)

        if self.remat_policy != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[self.remat_policy])
        if layer_cache_fn is not None:
            per_layer = self.layers.per_layer() if layer_params is None else layer_params
            caches = []
            for i, p in enumerate(per_layer):
                # The barrier makes the next layer wait for this layer's cache writes: left free, XLA deferred them
                # and kept every layer's pending updates live at once.
                x, cache = jax.lax.optimization_barrier(layer(x, p, layer_cache_fn(i)))
                caches.append(cache)
            return rms_norm(x, self.final_norm[...], cfg.rms_norm_eps), caches
        if kv_cache is not None:
            per_layer = self.layers.per_layer() if layer_params is None else layer_params
            x, kv_cache = self._cached_layers(layer, x, per_layer, kv_cache, positions, segment_ids, cache_window)
        elif self.scan_layers:
            def body(x, p):
                return layer(x, p, None)[0], None

            x, _ = jax.lax.scan(body, x, self.layers.arrays())
        else:
            for p in self.layers.per_layer():
                x, _ = layer(x, p, None)
        hidden = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
        if kv_cache is None:
            return hidden
        return hidden, kv_cache

    def _cached_layers(self, layer, x, per_layer, kv_cache, positions, segment_ids, cache_window):
        # Layers are unrolled over the per-layer cache buffers: a scan would slice and re-stack the cache
        # (copies of the whole cache every step); unrolled, each scatter updates its own donated buffer in place.
        window = kv_cache.max_len if cache_window is None else cache_window
        if not 0 < window <= kv_cache.max_len:
            raise ValueError(f"cache_window {cache_window} outside (0, cache length {kv_cache.max_len}]")
        kv_cache, idx = kvc.append_tokens(kv_cache, positions, segment_ids)
        mask = attention_mask(positions, kv_cache.positions[:, :window], segment_ids,
                              kv_cache.segment_ids[:, :window])
        ks, vs = [], []
        for i in range(self.config.num_layers):
            cache = _LayerCache(kv_cache.k[i], kv_cache.v[i], idx, mask, window)
            x, cache = layer(x, per_layer[i], cache)
            ks.append(cache.k)
            vs.append(cache.v)
        return x, dataclasses.replace(kv_cache, k=tuple(ks), v=tuple(vs))


def _check_inputs(tokens, positions, segment_ids):
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
    for name, arr in (("positions", positions), ("segment_ids", segment_ids)):
        if arr.shape != tokens.shape:
            raise ValueError(f"{name} shape {arr.shape} != tokens shape {tokens.shape}")


def param_shape(path: tuple[str, ...], config: Qwen3Config) -> tuple[int, ...]:
    """Shape of our parameter at `path` (e.g. ("layers", "q_proj") or ("embed",))."""
    e, v = config.hidden_size, config.vocab_size
    if path[0] == "layers":
        return (config.num_layers, *_LAYER_PARAMS[path[1]][0](config))
    return {"embed": (v, e), "final_norm": (e,), "lm_head": (e, v)}[path[0]]


def param_logical_axes(model: Qwen3):
    """nnx.State of PartitionSpecs holding logical axis names (no logical->mesh rules applied)."""
    return nnx.get_partition_spec(nnx.state(model, nnx.Param))
