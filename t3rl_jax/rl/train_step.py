"""The jitted GRPO update: micro-batched forward/backward with gradient accumulation, then one optax step.

A batch is a dict of arrays shaped [micro_batches, rows, length] (see `rl.batching.PackedBatch`, reshaped by
`micro_batch`). Token log-probs and entropies are computed from the final hidden states one sequence chunk at a
time under `jax.checkpoint`, and each chunk's vocabulary in slices (`rl.entropy`), so no [rows, length, vocab]
logits array ever exists: at 18k tokens and Qwen3's 151,936-wide vocabulary it would be 11 GB per row in float32.
When the output weight is sharded (FSDP), each chunk's projection is instead split over the vocabulary across the
devices holding the weight (`rl.vocab_parallel`), so no device gathers the whole weight or its gradient.

Every micro-batch divides by the *whole* batch's aggregation denominator, so accumulated gradients equal one
full-batch gradient; metrics carry their numerators and denominators (`rl.step_metrics`) and combine the same
way. A non-finite loss or gradient norm skips the update (parameters and optimizer state are kept)
and is reported in the metrics, so the loop can count consecutive bad steps.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from t3rl_jax.rl import step_metrics
from t3rl_jax.rl.aggregation import aggregation_denominator
from t3rl_jax.rl.entropy import logprobs_and_entropy_chunked
from t3rl_jax.rl.grpo import LossSettings, grpo_loss
from t3rl_jax.rl.vocab_parallel import VocabParallelLogprobs
from t3rl_jax.sharding import spec_axes

BATCH_KEYS = ("tokens", "positions", "segment_ids", "targets", "loss_mask", "rollout_logprobs", "advantages")


@dataclasses.dataclass(frozen=True)
class StepSettings:
    loss: LossSettings
    temperature: float = 1.0      # logits are scaled as at sampling time, so ratios compare like with like
    seq_chunk: int = 1024         # tokens per row per logits chunk (its f32 logits: the loss's largest temporary)
    vocab_chunk: int = 16384      # vocabulary slice inside a chunk
    old_logprobs: str = "trainer"  # "trainer": recomputed before the update; "rollout": the engine's own
    compact_logits: bool = True   # logits only at loss positions (under context parallelism each device
                                  # compacts its own block of the sequence: no activations move)

    def __post_init__(self):
        if self.old_logprobs not in ("trainer", "rollout"):
            raise ValueError(f"old_logprobs must be 'trainer' or 'rollout', got {self.old_logprobs!r}")
        if self.temperature <= 0:
            raise ValueError(f"training temperature must be > 0, got {self.temperature} (greedy has no log-probs)")


def make_optimizer(train_cfg) -> optax.GradientTransformation:
    """AdamW with global-norm clipping from the `train` config section."""
    if train_cfg.lr_schedule == "constant":
        schedule = optax.constant_schedule(train_cfg.lr)
        if train_cfg.warmup_steps:
            schedule = optax.linear_schedule(0.0, train_cfg.lr, train_cfg.warmup_steps)
            schedule = optax.join_schedules([schedule, optax.constant_schedule(train_cfg.lr)],
                                            [train_cfg.warmup_steps])
    elif train_cfg.lr_schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, train_cfg.lr, max(train_cfg.warmup_steps, 1),
                                                      max(train_cfg.num_steps, train_cfg.warmup_steps + 1))
    else:
        raise ValueError(f"train.lr_schedule {train_cfg.lr_schedule!r} is not 'constant' or 'cosine'")
    return optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip),
                       optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.adam_eps,
                                   weight_decay=train_cfg.weight_decay))


def micro_batch(batch: dict, num_micro_batches: int) -> dict:
    """[rows, length] arrays -> [num_micro_batches, rows / num_micro_batches, length]."""
    out = {}
    for key in BATCH_KEYS:
        x = np.asarray(batch[key])
        if x.shape[0] % num_micro_batches:
            raise ValueError(f"{x.shape[0]} rows do not split into {num_micro_batches} micro-batches")
        out[key] = x.reshape(num_micro_batches, x.shape[0] // num_micro_batches, *x.shape[1:])
    return out


def loss_slots(loss_mask, length: int, shards: int = 1, multiple: int | None = None) -> int:
    """Static number of positions that get logits in each of a row's `shards` blocks (one per context-parallel
    device; the mask's last axis split evenly): the most masked targets in any block, rounded up to a power of two
    (few compilations across steps whose replies vary) or, with `multiple`, to a multiple of it (data that never
    changes, like the warm start's, compiles once anyway), capped at `length / shards`."""
    mask = np.asarray(loss_mask) > 0
    if mask.shape[-1] % shards or length % shards:
        raise ValueError(f"row length {mask.shape[-1]} (cap {length}) does not split into {shards} length shards")
    blocks = mask.reshape(*mask.shape[:-1], shards, mask.shape[-1] // shards)
    most = int(blocks.sum(axis=-1).max()) if mask.size else 0
    if multiple:
        slots = max(-(-most // multiple) * multiple, multiple)
    else:
        slots = 1
        while slots < most:
            slots *= 2
        slots = max(slots, 16)
    return min(slots, length // shards)


def length_shards(batch_sharding) -> int:
    """How many devices split the length of a [rows, length] batch (the context-parallel degree; 1 unsharded)."""
    if not isinstance(batch_sharding, NamedSharding) or len(batch_sharding.spec) < 2:
        return 1
    return math.prod(batch_sharding.mesh.shape[a] for a in spec_axes(batch_sharding.spec[1]))


def _compact_rows(hidden, targets, loss_mask, num_slots: int):
    """Per row: its first `num_slots` positions ordered masked-first -> (hidden, targets, order)."""
    order = jnp.argsort(loss_mask <= 0, axis=1, stable=True)[:, :num_slots]
    return (jnp.take_along_axis(hidden, order[..., None], axis=1), jnp.take_along_axis(targets, order, axis=1),
            order)


def _expand_rows(values, order, length: int):
    row = jnp.arange(values.shape[0])[:, None]
    return jnp.zeros((values.shape[0], length), values.dtype).at[row, order].set(values, unique_indices=True)


def _per_shard(fn, arrays, shards: int, token_sharding):
    """`fn` on each row's `shards` contiguous length blocks as rows of their own, results concatenated per row.
    With a length-sharded `token_sharding` (context parallelism) each device runs `fn` on the blocks it holds
    (`shard_map`), so nothing moves between devices by construction. Left to the SPMD partitioner (the same
    gathers vmapped over the blocks), test_resume's 8-device CPU program deadlocked in its collectives whenever it
    was loaded from the compilation cache (devices waiting at different collectives)."""
    if shards == 1:
        return fn(*arrays)
    if isinstance(token_sharding, NamedSharding):
        rows_axes, length_axes = token_sharding.spec[0], token_sharding.spec[1]
        specs = tuple(PartitionSpec(rows_axes, length_axes, *([None] * (a.ndim - 2))) for a in arrays)
        out = jax.eval_shape(fn, *(jax.ShapeDtypeStruct((a.shape[0], a.shape[1] // shards, *a.shape[2:]), a.dtype)
                                   for a in arrays))
        out_specs = jax.tree.map(lambda o: PartitionSpec(rows_axes, length_axes, *([None] * (o.ndim - 2))), out)
        return jax.shard_map(fn, mesh=token_sharding.mesh, in_specs=specs, out_specs=out_specs,
                             check_vma=False)(*arrays)
    rows = arrays[0].shape[0]
    split = lambda a: a.reshape(rows * shards, a.shape[1] // shards, *a.shape[2:])  # noqa: E731
    return jax.tree.map(lambda o: o.reshape(rows, shards * o.shape[1], *o.shape[2:]), fn(*map(split, arrays)))


def compact_to_loss_slots(hidden, targets, loss_mask, num_slots: int, shards: int = 1, token_sharding=None):
    """(hidden [rows, shards * num_slots, E], targets, order [rows, shards * num_slots]): in each of a row's `shards`
    contiguous length blocks (its context-parallel shards), the block's first `num_slots` positions ordered
    masked-first (every masked target is among them when `num_slots` comes from `loss_slots`); `order` holds
    positions within the block."""
    return _per_shard(functools.partial(_compact_rows, num_slots=num_slots), (hidden, targets, loss_mask), shards,
                      token_sharding)


def expand_from_loss_slots(values, order, length: int, shards: int = 1, token_sharding=None):
    """Inverse of `compact_to_loss_slots` for per-slot values [rows, shards * num_slots] -> [rows, length], 0 at
    the positions that got no logits."""
    return _per_shard(functools.partial(_expand_rows, length=length // shards), (values, order), shards,
                      token_sharding)


def output_weight(model):
    """The LM head as [embed, vocab] in the parameter dtype (the tied embedding table transposed)."""
    return model.embed[...].T if model.config.tie_word_embeddings else model.lm_head[...]


def vocab_parallel_for(model, param_shardings, batch_sharding) -> VocabParallelLogprobs | None:
    """The vocab-parallel loss projection for a sharded output weight, or None when nothing shards it."""
    if param_shardings is None or not isinstance(batch_sharding, NamedSharding):
        return None
    tied = model.config.tie_word_embeddings
    spec = tuple(param_shardings["embed" if tied else "lm_head"].get_value().spec)
    spec = spec + (None,) * (2 - len(spec))
    vp = VocabParallelLogprobs(batch_sharding.mesh, PartitionSpec(*(spec[::-1] if tied else spec)),
                               batch_sharding.spec)
    return vp if vp.group else None


def _chunk_width(width: int, seq_chunk: int, multiple: int) -> int | None:
    """The largest divisor of `width` not above `seq_chunk` that is a multiple of `multiple` (None if none)."""
    return next((c for c in range(min(seq_chunk, width), 0, -1) if width % c == 0 and c % multiple == 0), None)


def token_logprobs_and_entropy(model, tokens, positions, segment_ids, targets, loss_mask=None, *,
                               temperature: float, seq_chunk: int, vocab_chunk: int, num_slots: int | None = None,
                               vocab_parallel: VocabParallelLogprobs | None = None, shards: int = 1,
                               token_sharding: NamedSharding | None = None):
    """Log-prob of each target token and the entropy of each position's distribution, both [rows, length].

    With `num_slots`, logits are computed only at the first `num_slots` positions of each of the row's `shards`
    blocks (its context-parallel shards) ordered masked-first: every masked target is among them (the caller sizes
    `num_slots` with `loss_slots`), and the vocabulary projection, by far the largest cost for long prompts with
    short replies, runs on those positions alone. Values at other positions are 0 and must be masked by the caller.

    With `vocab_parallel` (a sharded output weight), each chunk's projection is split over the vocabulary across
    the devices that shard the weight instead of gathering the whole weight on each (`rl/vocab_parallel.py`).
    """
    hidden = model.hidden_states(tokens, positions, segment_ids)
    rows, length, embed = hidden.shape
    order = None
    if num_slots is not None and num_slots < length // shards:
        hidden, targets, order = compact_to_loss_slots(hidden, targets, loss_mask, num_slots, shards, token_sharding)
    width = hidden.shape[1]
    # Equal chunks (no padded copy of the activations); the vocab-parallel path also needs every chunk split
    # evenly over the length shards, and falls back to the plain projection when the width allows no such chunk.
    chunk = None
    if vocab_parallel is not None and rows % vocab_parallel.token_multiple[0] == 0:
        chunk = _chunk_width(width, seq_chunk, vocab_parallel.token_multiple[1])
    if chunk is None:
        vocab_parallel = None
        chunk = _chunk_width(width, seq_chunk, shards) or _chunk_width(width, seq_chunk, 1)
    n = width // chunk
    # Strided chunks (chunk i holds tokens i, i+n, i+2n, ...): under context parallelism every chunk is spread
    # evenly over the sequence shards, so chunking moves no activations between devices.
    h = hidden.reshape(rows, chunk, n, embed).transpose(2, 0, 1, 3)
    t = targets.reshape(rows, chunk, n).transpose(2, 0, 1)

    weight = None if vocab_parallel is None else vocab_parallel.shard_weight(output_weight(model))

    def one_vocab_parallel(args):
        # No checkpoint needed: its backward keeps only the chunk's hidden states and two statistics per token.
        h_c, t_c = args
        return vocab_parallel(h_c, weight, t_c, temperature=temperature, compute_dtype=model.compute_dtype)

    @jax.checkpoint
    def one(args):
        h_c, t_c = args
        logits = model.logits_from_hidden(h_c) / temperature
        return logprobs_and_entropy_chunked(logits, t_c, chunk_size=vocab_chunk)

    logp, ent = jax.lax.map(one if vocab_parallel is None else one_vocab_parallel, (h, t))
    logp, ent = (x.transpose(1, 2, 0).reshape(rows, width) for x in (logp, ent))
    if order is None:
        return logp, ent
    return (expand_from_loss_slots(logp, order, length, shards, token_sharding),
            expand_from_loss_slots(ent, order, length, shards, token_sharding))


class GRPOStep:
    """Holds the model graph and settings; three jitted pieces run per micro-batch / per step.

    Micro-batches are looped on the host (one compiled shape whatever the number of micro-batches, which varies
    with how many tokens a step's rollouts produced); gradients accumulate in a donated buffer.
    """

    def __init__(self, model, optimizer: optax.GradientTransformation, settings: StepSettings, *,
                 param_shardings=None, opt_shardings=None, batch_sharding=None, donate: bool = True):
        self.graphdef, _, self.rest = nnx.split(model, nnx.Param, ...)
        self.optimizer = optimizer
        self.settings = settings
        self._shardings = (param_shardings, opt_shardings, batch_sharding)
        self.vocab_parallel = vocab_parallel_for(model, param_shardings, batch_sharding)
        self.length_shards = length_shards(batch_sharding)
        self._compiled: dict = {}
        self._apply = jax.jit(self._apply_impl, in_shardings=(param_shardings, opt_shardings, param_shardings),
                              out_shardings=(param_shardings, opt_shardings, None),
                              donate_argnums=(0, 1, 2) if donate else (2,))

    def slots_for(self, batch: dict) -> int | None:
        if not self.settings.compact_logits:
            return None
        return loss_slots(batch["loss_mask"], batch["tokens"].shape[-1], self.length_shards)

    def functions_for(self, num_slots: int | None):
        """(logprobs, first_grad, accumulate_grad) compiled for one static number of logit positions per row.

        The first micro-batch's gradient is the buffer itself (no zero-initialised accumulator, no add); later
        micro-batches add into it in place (donated).
        """
        if num_slots not in self._compiled:
            p, _, b = self._shardings
            logprobs = jax.jit(functools.partial(self._logprobs_impl, num_slots=num_slots), in_shardings=(p, b),
                               out_shardings=b)
            first = jax.jit(functools.partial(self._grad_impl, num_slots=num_slots),
                            in_shardings=(p, b, b, b, None, None), out_shardings=(p, None))
            accumulate = jax.jit(functools.partial(self._accumulate_impl, num_slots=num_slots),
                                 in_shardings=(p, p, b, b, b, None, None), out_shardings=(p, None),
                                 donate_argnums=(1,))
            self._compiled[num_slots] = (logprobs, first, accumulate)
        return self._compiled[num_slots]

    def _model(self, params):
        return nnx.merge(self.graphdef, params, self.rest)

    def _stats(self, params, mb, num_slots):
        s = self.settings
        return token_logprobs_and_entropy(self._model(params), mb["tokens"], mb["positions"], mb["segment_ids"],
                                          mb["targets"], mb["loss_mask"], temperature=s.temperature,
                                          seq_chunk=s.seq_chunk, vocab_chunk=s.vocab_chunk, num_slots=num_slots,
                                          vocab_parallel=self.vocab_parallel, shards=self.length_shards,
                                          token_sharding=self._shardings[2])

    def _logprobs_impl(self, params, mb, *, num_slots):
        return self._stats(params, mb, num_slots)[0]

    def step_slots(self, batches: list[dict]) -> int | None:
        """One logit-slot count for all of a step's mini-batches (their largest), so a step compiles one shape."""
        slots = [self.slots_for(b) for b in batches]
        return None if None in slots else max(slots)

    def logprobs(self, params, batch: dict, *, num_slots: int | None = None):
        """Token log-probs [micro, rows, length] under `params` (old policy or reference), no gradient."""
        fn = self.functions_for(self.slots_for(batch) if num_slots is None else num_slots)[0]
        return [fn(params, mb) for mb in _split(batch)]

    def _grad_impl(self, params, mb, old, ref, denominator, own_anchor, *, num_slots):
        """Forward + backward of one micro-batch -> (gradients, metrics). `own_anchor` true (a traced flag, so
        both cases share one compilation): the PPO anchor is `params` itself, i.e. this forward's own log-probs
        without gradient (ratio 1, the on-policy surrogate), and `old` is ignored."""
        s = self.settings

        def loss_fn(p):
            logp, ent = self._stats(p, mb, num_slots)
            old_logp = jnp.where(own_anchor, jax.lax.stop_gradient(logp), old)
            return grpo_loss(s.loss, logp=logp, old_logp=old_logp, advantages=mb["advantages"], mask=mb["loss_mask"],
                             entropy=ent, ref_logp=ref if s.loss.needs_reference else None,
                             rollout_logp=mb["rollout_logprobs"] if s.old_logprobs == "trainer" else None,
                             segment_ids=mb["segment_ids"], denominator=denominator)

        (_, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return g, metrics

    def _accumulate_impl(self, params, grads, mb, old, ref, denominator, own_anchor, *, num_slots):
        g, metrics = self._grad_impl(params, mb, old, ref, denominator, own_anchor, num_slots=num_slots)
        return jax.tree.map(jnp.add, grads, g), metrics

    def _apply_impl(self, params, opt_state, grads):
        with jax.named_scope("optimizer"):
            return self._apply_body(params, opt_state, grads)

    def _apply_body(self, params, opt_state, grads):
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(grad_norm)
        updates, new_opt = self.optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        return keep(new_params, params), keep(new_opt, opt_state), {"grad_norm": grad_norm}

    def update(self, params, opt_state, batch: dict, *, old_logprobs=None, ref_logprobs=None):
        """One optimizer step over all micro-batches of `batch` ([micro, rows, length] arrays).

        Returns (params, opt_state, metrics) with metrics as host floats (see `update_weighted`).
        """
        params, opt_state, metrics = self.update_weighted(params, opt_state, batch, old_logprobs=old_logprobs,
                                                          ref_logprobs=ref_logprobs)
        return params, opt_state, step_metrics.values(metrics)

    def update_weighted(self, params, opt_state, batch: dict, *, old_logprobs=None, ref_logprobs=None,
                        num_slots: int | None = None):
        """`update` with its metrics as host `step_metrics.Weighted`: each micro-batch's metrics combine by their
        own reducer, so every value is the whole batch's (independent of the number of micro-batches), and a
        caller can combine several updates (mini-batches) the same way. `num_slots`: logit positions per row
        (default: `slots_for(batch)`; a caller with several mini-batches passes `step_slots` of them all)."""
        s = self.settings
        micro = _split(batch)
        # The old policy is `params`, which every micro-batch's gradient is taken at: each forward is its own
        # anchor, and a separate log-prob pass over the batch would compute the same numbers again.
        own_anchor = old_logprobs is None and s.old_logprobs == "trainer"
        if old_logprobs is None:
            # The anchor itself, or ignored (own_anchor). Placed as `logprobs` places its output: on a mesh, a numpy
            # argument here and a device array from `logprobs` for the next mini-batch compile twice.
            old_logprobs = [jax.device_put(mb["rollout_logprobs"], self._shardings[2]) for mb in micro]
        if ref_logprobs is None:
            if s.loss.needs_reference:
                raise ValueError("kl_coef > 0: pass ref_logprobs from the reference parameters")
            ref_logprobs = old_logprobs  # unused by the loss; keeps one compiled signature
        length = batch["tokens"].shape[-1]
        denominator = np.maximum(np.asarray(aggregation_denominator(
            jnp.asarray(batch["loss_mask"]).reshape(-1, length), s.loss.loss_agg,
            segment_ids=jnp.asarray(batch["segment_ids"]).reshape(-1, length))), 1.0)
        _, first, accumulate = self.functions_for(self.slots_for(batch) if num_slots is None else num_slots)
        denominator = denominator.astype(np.float32)
        own = np.bool_(own_anchor)
        grads, collected = None, []
        for mb, old, ref in zip(micro, old_logprobs, ref_logprobs):
            if grads is None:
                grads, metrics = first(params, mb, old, ref, denominator, own)
            else:
                grads, metrics = accumulate(params, grads, mb, old, ref, denominator, own)
            collected.append(metrics)
        merged = step_metrics.combine(jax.device_get(collected))
        params, opt_state, applied = self._apply(params, opt_state, grads)
        grad_norm = float(applied["grad_norm"])
        finite = np.isfinite(float(merged["loss"])) and np.isfinite(grad_norm)
        Weighted = step_metrics.Weighted
        merged["grad_norm"] = Weighted(grad_norm, 1.0)  # one per optimizer step: mini-batches average it
        merged["skipped_nonfinite"] = Weighted(0.0 if finite else 1.0, 1.0, "max")
        merged["num_loss_tokens"] = Weighted(float(np.sum(batch["loss_mask"])), 1.0, "sum")
        merged["num_micro_batches"] = Weighted(float(len(micro)), 1.0, "sum")
        return params, opt_state, merged


def _split(batch: dict) -> list[dict]:
    n = batch["tokens"].shape[0]
    return [{k: batch[k][i] for k in BATCH_KEYS} for i in range(n)]
