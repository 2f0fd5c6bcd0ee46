"""The decode state of a slot-based engine and where it lives: `DecodeState` (the KV cache plus per-slot sampling
state), its empty value, and its shardings on a mesh (`DecodeLayout`). Also `SamplingSettings`.

On a mesh the slots (and an extend's computed rows) split over every axis of SLOT_AXES that divides them: the KV
cache dominates rollout memory (replicated over `sequence`, stage 2 held 162 GiB of it per device), so no axis is
left unused when the slot count allows. KV heads split over `tensor` when it divides them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from t3rl_jax.models import kv_cache as kvc

SLOT_AXES = ("data", "fsdp", "sequence")  # mesh axes the decode state's slots (and an extend's rows) split over


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    cache: kvc.KVCache
    tokens: jax.Array       # [B] int32: last sampled token, fed at the next decode step
    active: jax.Array       # [B] bool: the slot is generating
    seeds: jax.Array        # [B] uint32: sampling seed of the slot's episode
    temperature: jax.Array  # [B] float32
    top_p: jax.Array        # [B] float32
    limits: jax.Array       # [B] int32: stop once the cache holds this many tokens


def slot_axes(mesh: jax.sharding.Mesh, rows: int) -> tuple[str, ...]:
    """Mesh axes (of SLOT_AXES, in order) that `rows` split over: each taken while the product still divides."""
    axes, size = [], 1
    for a in SLOT_AXES:
        n = mesh.shape.get(a, 1)
        if n > 1 and rows % (size * n) == 0:
            axes.append(a)
            size *= n
    return tuple(axes)


@dataclasses.dataclass(frozen=True)
class DecodeLayout:
    """Shape and placement of one engine's decode state: `slots` rows of `max_len` cached tokens."""

    config: object            # the model config (layers, KV heads, head dim)
    mesh: jax.sharding.Mesh
    slots: int
    max_len: int
    cache_dtype: object = jnp.float32

    def empty(self) -> DecodeState:
        b = self.slots
        cache = kvc.KVCache.for_config(self.config, batch=b, max_len=self.max_len, dtype=self.cache_dtype)
        return DecodeState(cache=cache, tokens=jnp.zeros((b,), jnp.int32), active=jnp.zeros((b,), bool),
                           seeds=jnp.zeros((b,), jnp.uint32), temperature=jnp.ones((b,), jnp.float32),
                           top_p=jnp.ones((b,), jnp.float32), limits=jnp.zeros((b,), jnp.int32))

    def abstract(self) -> DecodeState:
        """ShapeDtypeStructs of the state, with its shardings (for compile-only checks)."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            jax.eval_shape(self.empty), self.shardings())

    def shardings(self) -> DecodeState:
        """Slots over every slot axis that divides them, KV heads over `tensor` when it divides them; always on
        the same devices as the parameters."""
        mesh = self.mesh
        slots = slot_axes(mesh, self.slots) or None
        tensor = mesh.shape.get("tensor", 1)
        heads = "tensor" if tensor > 1 and self.config.num_kv_heads % tensor == 0 else None

        def spec(*entries):
            return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*entries))

        layers = range(self.config.num_layers)
        cache = kvc.KVCache(k=tuple(spec(slots, heads) for _ in layers), v=tuple(spec(slots, heads) for _ in layers),
                            positions=spec(slots), segment_ids=spec(slots), lengths=spec(slots))
        return DecodeState(cache=cache, tokens=spec(slots), active=spec(slots), seeds=spec(slots),
                           temperature=spec(slots), top_p=spec(slots), limits=spec(slots))

    def constrain(self, state: DecodeState) -> DecodeState:
        """Pin a traced state to its shardings (a no-op off a mesh)."""
        if self.mesh.size == 1:
            return state
        return jax.lax.with_sharding_constraint(state, self.shardings())

    def row_sharding(self, rows: int) -> jax.sharding.NamedSharding:
        """NamedSharding of an extend's [rows, ...] arrays: rows over the slot axes that divide them."""
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(slot_axes(self.mesh, rows) or None))
