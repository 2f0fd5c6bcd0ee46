"""A rollout backend over slot classes by cache length: one `Qwen3Engine` decode state per class, sharing one set of
parameters, so that only a few slots reserve the longest context an episode can reach.

Today's episodes mostly stay short (BFCL base / miss_* ground truths <= 5.7k tokens) while a few long_context ones
need ~42k; one class of 64 x 49,152-token slots reserved 464 GB of KV cache for that. Here slots have global ids,
class by class in increasing cache length (`slot_classes`), mapped to (class, local slot) on every call. The
scheduler (`slot_pool.SlotPool`) decides which episode runs in which class; `move_slot` carries an episode that
outgrows its slot into a larger one by copying its cached keys and values (and its decode fields) there. A copy, not
a re-prefill: a prefill computes keys in other shapes than the decode steps that wrote them, and their rounding
differences flip sampled tokens; copied, the episode goes on bit for bit as it would have in a large slot (sampling
depends only on (episode seed, position)), and a copy moves bytes instead of recomputing the history.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from t3rl_jax.models import kv_cache as kvc
from t3rl_jax.models.attention import PAD_SEGMENT
from t3rl_jax.rollout.decode_state import DecodeLayout, DecodeState, slot_axes
from t3rl_jax.rollout.engine import Qwen3Engine, context_bound_of
from t3rl_jax.rollout.extend_batch import ExtendRequest


def _class_bound(context_bound, engine_slots: range):
    """The context bound of one class's call: an int applies to every class, a {slot: bound} mapping per slot."""
    if isinstance(context_bound, dict):
        return max((b for s, b in context_bound.items() if s in engine_slots), default=None)
    return context_bound


def _position(axes, mesh) -> jax.Array:
    """This device's index along `axes` (major to minor, as a PartitionSpec entry splits a dimension)."""
    index = jnp.int32(0)
    for axis in axes:
        index = index * mesh.shape[axis] + jax.lax.axis_index(axis)
    return index


def _move_local(src: DecodeState, dst: DecodeState, src_slot, dst_slot, limit, decoding, *, src_axes, dst_axes,
                mesh):
    """`_move` on one device's shards: the device holding `src_slot` contributes its row, a sum over the source's
    slot axes hands it to every device, and the device holding `dst_slot` writes it in place."""
    bs, bd = src.tokens.shape[0], dst.tokens.shape[0]
    s0, d0 = _position(src_axes, mesh) * bs, _position(dst_axes, mesh) * bd
    i, j = src_slot - s0, dst_slot - d0
    mine_src, mine_dst = (i >= 0) & (i < bs), (j >= 0) & (j < bd)
    i, j = jnp.clip(i, 0, bs - 1), jnp.clip(j, 0, bd - 1)

    def carry(x):
        row = jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=True)
        wide = row.astype(jnp.int32) if row.dtype == jnp.bool_ else row
        wide = jnp.where(mine_src, wide, jnp.zeros_like(wide))  # x + 0 is x: the sum is the row, bit for bit
        return (jax.lax.psum(wide, src_axes) if src_axes else wide).astype(row.dtype)

    def write(buffer, row):
        start = (j,) + (0,) * (buffer.ndim - 1)
        old = jax.lax.dynamic_slice(buffer, start, row.shape)
        return jax.lax.dynamic_update_slice(buffer, jnp.where(mine_dst, row.astype(buffer.dtype), old), start)

    c, d = src.cache, dst.cache
    segments = jnp.full((1, d.max_len), PAD_SEGMENT, d.segment_ids.dtype)
    segments = jax.lax.dynamic_update_slice(segments, carry(c.segment_ids), (0, 0))
    cache = kvc.KVCache(k=tuple(write(b, carry(k)) for b, k in zip(d.k, c.k)),  # the first n keys; the rest stay
                        v=tuple(write(b, carry(v)) for b, v in zip(d.v, c.v)),  # stale, masked by segment ids
                        positions=write(d.positions, carry(c.positions)), segment_ids=write(d.segment_ids, segments),
                        lengths=write(d.lengths, carry(c.lengths)))
    moved = DecodeState(cache=cache, tokens=write(dst.tokens, carry(src.tokens)),
                        active=write(dst.active, jnp.reshape(decoding, (1,))),
                        seeds=write(dst.seeds, carry(src.seeds)),
                        temperature=write(dst.temperature, carry(src.temperature)),
                        top_p=write(dst.top_p, carry(src.top_p)),
                        limits=write(dst.limits, jnp.reshape(jnp.minimum(limit, d.max_len), (1,))))
    gone = s0 + jnp.arange(bs) == src_slot
    src = DecodeState(cache=kvc.clear_rows(c, gone), tokens=src.tokens, active=src.active & ~gone, seeds=src.seeds,
                      temperature=src.temperature, top_p=src.top_p, limits=src.limits)
    return src, moved


def _move(src_layout: DecodeLayout, dst_layout: DecodeLayout, src: DecodeState, dst: DecodeState, src_slot,
          dst_slot, limit, decoding):
    """Copy slot `src_slot` of `src` into slot `dst_slot` of `dst` (a longer cache) and empty the source slot.

    The destination stops at `limit` (the reply's own, no longer capped by the smaller cache) and generates on when
    `decoding` (a reply cut by the full source slot: its last sampled token is fed at the next step). Per device
    under `shard_map`: left to GSPMD, a one-row gather and scatter on slot-split buffers took a temporary of 36 GiB
    per device on stage 1; this way one row crosses the devices (one all-reduce) and both states stay in place."""
    mesh = dst_layout.mesh
    local = functools.partial(_move_local, src_axes=slot_axes(mesh, src_layout.slots),
                              dst_axes=slot_axes(mesh, dst_layout.slots), mesh=mesh)
    if mesh.size == 1:
        return local(src, dst, src_slot, dst_slot, limit, decoding)
    specs = [jax.tree.map(lambda sharding: sharding.spec, layout.shardings()) for layout in (src_layout, dst_layout)]
    scalar = jax.sharding.PartitionSpec()
    return jax.shard_map(local, mesh=mesh, in_specs=(*specs, scalar, scalar, scalar, scalar),
                         out_specs=tuple(specs), check_vma=False)(src, dst, src_slot, dst_slot, limit, decoding)


class SlotClassBackend:
    def __init__(self, engines: list[Qwen3Engine]):
        """`engines`: one per class, increasing cache lengths, built over the same model (`build`)."""
        lengths = [e.max_cache_length for e in engines]
        if not engines or lengths != sorted(set(lengths)):
            raise ValueError(f"SlotClassBackend needs engines of increasing cache lengths, got {lengths}")
        self.engines = list(engines)
        starts = np.cumsum([0] + [e.max_concurrent_decodes for e in engines])
        self._ranges = [range(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]
        self._max_prefill = max(e.max_prefill_length for e in engines)
        self._move_jits = {}
        self._generate_all = None

    @classmethod
    def build(cls, model, slot_classes, *, max_prefill_length: int, **engine_kwargs) -> "SlotClassBackend":
        """One engine per (slots, cache length) of `slot_classes`; a class shorter than `max_prefill_length`
        prefills in chunks of its own length."""
        classes = sorted(((int(s), int(n)) for s, n in slot_classes), key=lambda c: c[1])
        return cls([Qwen3Engine(model, max_concurrent_decodes=s, max_cache_length=n,
                                max_prefill_length=min(max_prefill_length, n), **engine_kwargs) for s, n in classes])

    # ------------------------------------------------------------------ shape
    @property
    def slot_classes(self) -> tuple[tuple[int, int], ...]:
        return tuple((e.max_concurrent_decodes, e.max_cache_length) for e in self.engines)

    @property
    def max_concurrent_decodes(self) -> int:
        return self._ranges[-1].stop

    @property
    def max_prefill_length(self) -> int:
        return self._max_prefill

    @property
    def max_cache_length(self) -> int:
        return self.engines[-1].max_cache_length

    def slot_capacity(self, slot: int) -> int:
        return self.engines[self._locate(slot)[0]].max_cache_length

    @property
    def sampling(self):
        return self.engines[0].sampling

    @property
    def mesh(self):
        return self.engines[0].mesh

    def _locate(self, slot: int) -> tuple[int, int]:
        for k, r in enumerate(self._ranges):
            if slot in r:
                return k, slot - r.start
        raise ValueError(f"slot {slot} outside [0, {self.max_concurrent_decodes})")

    # ------------------------------------------------------------------ params
    @property
    def params(self):
        return self.engines[0].params

    def update_params(self, params) -> None:
        # Placed once by the first engine; the others then find every array where they want it (no second copy).
        self.engines[0].update_params(params)
        for engine in self.engines[1:]:
            engine.update_params(self.engines[0].params)

    # ------------------------------------------------------------------ slots
    def init_decode_state(self) -> tuple:
        return tuple(e.init_decode_state() for e in self.engines)

    def extend_slots(self, params, state: tuple, requests: list[ExtendRequest], *, context_bound=None):
        """`Qwen3Engine.extend_slots` over global slots: one call per class the requests touch."""
        by_class: dict[int, list[tuple[int, ExtendRequest]]] = {}
        for i, r in enumerate(requests):
            k, local = self._locate(r.slot)
            by_class.setdefault(k, []).append((i, ExtendRequest(local, r.tokens, reset=r.reset, seed=r.seed,
                                                                limit=r.limit, sampling=r.sampling)))
        state = list(state)
        outs = {}
        for k, items in by_class.items():  # dispatched one after another, synchronised only below
            bound = _class_bound(context_bound, self._ranges[k])
            state[k], *outs[k] = self.engines[k].extend_slots(params, state[k], [r for _, r in items],
                                                              context_bound=bound)
        if len(by_class) == 1:
            return (tuple(state), *outs[next(iter(by_class))])
        n = len(requests)
        tokens, logprobs, lengths = np.zeros(n, np.int32), np.zeros(n, np.float32), np.zeros(n, np.int32)
        for k, items in by_class.items():
            order = [i for i, _ in items]
            tokens[order], logprobs[order], lengths[order] = map(np.asarray, outs[k])
        return tuple(state), tokens, logprobs, lengths

    def generate_steps(self, params, state: tuple, num_steps: int, *, context_bound=None):
        """Decode steps over every class holding a slot of `context_bound` ({slot: bound}; an int or None runs
        every class) -> (state, tokens, logprobs, valid, lengths) as host arrays [num_steps, all slots]; the
        columns of classes that did not run are invalid."""
        state = list(state)
        ran = {}
        for k, engine in enumerate(self.engines):
            bound = _class_bound(context_bound, self._ranges[k])
            if isinstance(context_bound, dict) and bound is None:
                continue
            state[k], *ran[k] = engine.generate_steps(params, state[k], num_steps, context_bound=bound)
        total = self.max_concurrent_decodes
        tokens, logprobs = np.zeros((num_steps, total), np.int32), np.zeros((num_steps, total), np.float32)
        valid, lengths = np.zeros((num_steps, total), bool), np.zeros((num_steps, total), np.int32)
        for k, outs in ran.items():
            r = self._ranges[k]
            for dst, src in zip((tokens, logprobs, valid, lengths), outs):
                dst[:, r.start:r.stop] = np.asarray(src)
        return tuple(state), tokens, logprobs, valid, lengths

    @property
    def generate_function(self):
        """One jitted decode of every class (`num_steps` static; not donating), e.g. for HLO dumps."""
        if self._generate_all is None:
            fns = [e.generate_function for e in self.engines]

            def every_class(params, states, *, num_steps: int):
                return tuple(f(params, s, num_steps=num_steps) for f, s in zip(fns, states))

            self._generate_all = jax.jit(every_class, static_argnames=("num_steps",))
        return self._generate_all

    def finish_slot(self, state: tuple, slot: int, length: int) -> tuple:
        k, local = self._locate(slot)
        state = list(state)
        state[k] = self.engines[k].finish_slot(state[k], local, length)
        return tuple(state)

    def _move_jit(self, a: int, b: int):
        if (a, b) not in self._move_jits:
            layouts = self.engines[a].layout, self.engines[b].layout
            self._move_jits[a, b] = jax.jit(functools.partial(_move, *layouts), donate_argnums=(0, 1))
        return self._move_jits[a, b]

    def move_slot(self, state: tuple, src: int, dst: int, *, limit: int, decoding: bool) -> tuple:
        """Carry `src`'s history and decode fields into `dst`, a slot of a larger class, and empty `src`.

        `limit`: the cache length at which `dst` stops (the reply's limit); `decoding`: `dst` goes on generating
        (a reply cut by the full `src`), else it waits for its next prefill."""
        (a, i), (b, j) = self._locate(src), self._locate(dst)
        if self.engines[b].max_cache_length <= self.engines[a].max_cache_length:
            raise ValueError(f"move_slot: slot {dst} ({self.engines[b].max_cache_length} tokens) is not larger "
                             f"than slot {src} ({self.engines[a].max_cache_length})")
        state = list(state)
        state[a], state[b] = self._move_jit(a, b)(state[a], state[b], jnp.int32(i), jnp.int32(j), jnp.int32(limit),
                                                  jnp.bool_(decoding))
        return tuple(state)

    def prefill_cost(self, requests: list[ExtendRequest]) -> int:
        by_class: dict[int, list[ExtendRequest]] = {}
        for r in requests:
            by_class.setdefault(self._locate(r.slot)[0], []).append(r)
        return sum(self.engines[k].prefill_cost(rs) for k, rs in by_class.items())

    # ------------------------------------------------------------------ ahead-of-time compilation
    def compile_targets(self, abstract_params=None, **kwargs) -> dict:
        """Every class's `Qwen3Engine.compile_targets`, named `<function>@<slots>x<cache length>`, and the move
        from each class to every larger one, `move_to_<cache length>@<slots>x<cache length>`."""
        out = {}
        for engine in self.engines:
            suffix = f"@{engine.max_concurrent_decodes}x{engine.max_cache_length}"
            for name, target in engine.compile_targets(abstract_params, **kwargs).items():
                out[name + suffix] = target
        scalars = [jax.ShapeDtypeStruct((), t) for t in (jnp.int32, jnp.int32, jnp.int32, jnp.bool_)]
        for a, src in enumerate(self.engines):
            for b in range(a + 1, len(self.engines)):
                name = f"move_to_{self.engines[b].max_cache_length}@{src.max_concurrent_decodes}x{src.max_cache_length}"
                out[name] = (self._move_jit(a, b), (src.layout.abstract(), self.engines[b].layout.abstract(),
                                                    *scalars), {})
        return out


__all__ = ["SlotClassBackend", "context_bound_of"]
