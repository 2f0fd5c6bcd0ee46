"""Supervised warm start: cross-entropy on the assistant tokens of ground-truth trajectories, before GRPO step 0.

A random or very small model never writes a tool call, so every GRPO group scores 0 and nothing is learned (the CPU
demo's problem). The warm start replays the ground truth of a few training entries through the real rollout path
(engine, driver, environments, chat deltas: `rollout/scripted.py`), packs those trajectories like GRPO's rows, and
takes `warm_start.steps` AdamW steps on the mean cross-entropy of their loss-mask (assistant) tokens, or fewer:
`warm_start.until_loss` > 0 stops once a pass over the micro-batches averages at most that loss. With
`warm_start.wrong_argument_replays` each entry is also replayed with one argument value wrong in every call
(`scripted.wrong_argument_reply`) and trained on as well: demonstrations that agree on the format and the calls but
not on the values, which GRPO's reward then settles (the CPU demo). It has its own optimizer: GRPO's Adam moments
start fresh after it.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from t3rl_jax import data as data_lib
from t3rl_jax import distributed
from t3rl_jax import sharding as sh
from t3rl_jax.evaluation import category_of
from t3rl_jax.rl import batching
from t3rl_jax.rl.train_step import (length_shards, loss_slots, micro_batch, token_logprobs_and_entropy,
                                    vocab_parallel_for)
from t3rl_jax.rollout.driver import EpisodeRequest, RolloutDriver, RolloutLimits
from t3rl_jax.rollout.scripted import ground_truth_reply, wrong_argument_reply

SEQ_CHUNK, VOCAB_CHUNK = 1024, 16384


def sft_loss(logprobs, loss_mask):
    """Mean negative log-likelihood over the masked tokens of the batch (token mean)."""
    mask = loss_mask.astype(jnp.float32)
    return -jnp.sum(logprobs * mask) / jnp.maximum(jnp.sum(mask), 1.0)


ROW_MULTIPLE = 512
# Logit positions per row: the warm start's micro-batches never change, so their slot count is the exact need
# rounded to this, not GRPO's power of two: the demo's rows get 160 slots instead of 256, and its SFT step (2
# rows of 4,096 tokens, the vocabulary projection over 151,936 ids at every slot) took 1.76 s instead of 2.05
# (medians of 8 alternated steps, BENCHMARKS.md "Test-suite time", fifteenth session).
SLOT_MULTIPLE = 32


def sft_row_length(trajectories, max_seq_len: int) -> int:
    """Rows as long as the longest ground-truth trajectory needs (rounded up to ROW_MULTIPLE, at most
    `max_seq_len`): the warm start compiles its own step anyway, and attention's cost grows with the square of
    the row (the demo's replays are <= 4,034 tokens in 4,608-token training rows)."""
    longest = max((t.length for t in trajectories), default=1)
    return min(max_seq_len, -(-longest // ROW_MULTIPLE) * ROW_MULTIPLE)


def loss_target_reached(losses, until_loss: float, micro_batches: int) -> bool:
    """Whether the last pass over the `micro_batches` micro-batches averaged at most `until_loss` (0: never): a
    whole pass, so the stop does not hinge on one easy micro-batch."""
    if until_loss <= 0 or len(losses) < micro_batches:
        return False
    return float(np.mean(losses[-micro_batches:])) <= until_loss


def warm_start_entries(cfg) -> list[str]:
    """Entry ids of the training file the warm start replays: its first `warm_start.max_entries` records (0: as
    many as the GRPO data uses) after the data section's category filter."""
    path = os.path.join(cfg.data.splits_dir, cfg.data.train_file)
    if not os.path.exists(path):
        from environments.bfcl.splits import write_splits

        write_splits(cfg.data.splits_dir)
    limit = cfg.warm_start.max_entries or cfg.data.max_entries
    records = data_lib.load_split(path, max_entries=limit, categories=tuple(cfg.data.categories))
    return [data_lib.entry_id(r) for r in records]


def scripted_trajectories(cfg, entry_ids, *, engine, pool, chat, params, script=ground_truth_reply):
    """One teacher-forced episode per entry through the real rollout path, replaying `script`: with the ground
    truth every one must score full progress (else the data would teach wrong calls), checked here; any other
    script's replays must complete."""
    r = cfg.rollout
    # Ground-truth replies are one per step plus the answer; the episode's own limits are what training uses.
    limits = RolloutLimits(max_steps_per_turn=max(r.max_steps_per_turn, 2), max_model_calls=10 ** 6,
                           max_response_tokens=r.max_context_tokens, max_context_tokens=r.max_context_tokens,
                           prefill_tokens_per_call=r.prefill_tokens_per_call)
    style = {"prompt_style": cfg.prompt.style} if "prompt_style" in EpisodeRequest.__dataclass_fields__ else {}
    requests = [EpisodeRequest(e, group_id=i, augment=False, reward_kind="progress", category=category_of(e),
                               **style) for i, e in enumerate(entry_ids)]
    driver = RolloutDriver(engine, pool, chat, limits=limits, script=script)
    # Multi-host: each process replays its share of the entries; every process gets them all.
    trajectories = distributed.run_shared(lambda mine: driver.run(mine, params), requests)
    bad = [(t.entry_id, t.termination, t.extras.get("progress"),
            t.extras.get("env_error") or t.extras.get("failure_reason")) for t in trajectories
           if t.termination != "completed" or (script is ground_truth_reply and t.extras.get("progress") != 1.0)]
    if bad:
        raise ValueError(f"warm start: {script.__name__} replays that did not complete (the ground truth's with "
                         f"full progress) (entry, termination, progress, error): {bad[:5]}; raise "
                         f"rollout.max_context_tokens ({r.max_context_tokens}) or pick other warm_start entries")
    return trajectories


def make_sft_step(bundle, optimizer, *, param_shardings, batch_sharding, num_slots, cp: int, opt_shardings=None):
    """jitted (params, opt_state, micro-batch) -> (params, opt_state, loss, grad_norm), sharded like GRPO's step."""
    vocab_parallel = vocab_parallel_for(bundle.train_model(bundle.abstract_params), param_shardings,
                                        batch_sharding) if cp == 1 else None

    def loss_fn(params, mb):
        model = bundle.train_model(params)
        logp, _ = token_logprobs_and_entropy(
            model, mb["tokens"], mb["positions"], mb["segment_ids"], mb["targets"], mb["loss_mask"],
            temperature=1.0, seq_chunk=SEQ_CHUNK, vocab_chunk=VOCAB_CHUNK, num_slots=num_slots,
            vocab_parallel=vocab_parallel, shards=length_shards(batch_sharding), token_sharding=batch_sharding)
        return sft_loss(logp, mb["loss_mask"])

    def step(params, opt_state, mb):
        loss, grads = jax.value_and_grad(loss_fn)(params, mb)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.global_norm(grads)

    batch_shardings = {k: batch_sharding for k in ("tokens", "positions", "segment_ids", "targets", "loss_mask")}
    # The optimizer state keeps one sharding in and out: left free, the first step's outputs come back laid out
    # differently from `optimizer.init`'s and the second step compiles again.
    return jax.jit(step, in_shardings=(param_shardings, opt_shardings, batch_shardings),
                   out_shardings=(param_shardings, opt_shardings, None, None), donate_argnums=(0, 1))


def warm_start(cfg, *, bundle, mesh, param_shardings, batch_sharding, params, engine, pool, chat):
    """`cfg.warm_start.steps` SFT steps on ground-truth trajectories -> (params, per-step metrics).

    The engine samples from the returned parameters afterwards (update_params is called here)."""
    ws = cfg.warm_start
    t0 = time.perf_counter()
    entry_ids = warm_start_entries(cfg)
    # params=None: the engine's own, i.e. `params` (placed on this host's devices when multi-host)
    trajectories = scripted_trajectories(cfg, entry_ids, engine=engine, pool=pool, chat=chat, params=None)
    if ws.wrong_argument_replays:
        trajectories += scripted_trajectories(cfg, entry_ids, engine=engine, pool=pool, chat=chat, params=None,
                                              script=wrong_argument_reply)
    replay_s = time.perf_counter() - t0
    rows_per_micro = cfg.train.micro_batch_size
    row_length = sft_row_length(trajectories, cfg.train.max_seq_len)
    packed = batching.pack(trajectories, np.zeros(len(trajectories), np.float32), row_length=row_length,
                           pad_rows_to_multiple=rows_per_micro)
    arrays = packed.as_dict()
    cp = mesh.shape.get("sequence", 1)
    if cp > 1:
        from t3rl_jax.models.context_parallel import load_balance_batch

        arrays = load_balance_batch(arrays, cp)
    minis = micro_batch(arrays, arrays["tokens"].shape[0] // rows_per_micro)
    keys = ("tokens", "positions", "segment_ids", "targets", "loss_mask")
    micro = [{k: distributed.global_array(batch_sharding, minis[k][i]) for k in keys}
             for i in range(minis["tokens"].shape[0])]
    optimizer = optax.chain(optax.clip_by_global_norm(cfg.train.grad_clip), optax.adamw(ws.lr, weight_decay=0.0))
    opt_shardings = sh.optax_state_shardings(jax.eval_shape(optimizer.init, bundle.abstract_params),
                                             bundle.abstract_params, param_shardings, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    slots = loss_slots(arrays["loss_mask"], row_length, length_shards(batch_sharding), multiple=SLOT_MULTIPLE)
    step = make_sft_step(bundle, optimizer, param_shardings=param_shardings, batch_sharding=batch_sharding,
                         num_slots=slots, cp=cp, opt_shardings=opt_shardings)
    params = jax.tree.map(lambda x: x.copy(), params)  # the step donates its input; the caller's arrays stay
    metrics = []
    until = float(ws.until_loss)
    for i in range(ws.steps):
        mb = micro[i % len(micro)]
        t_step = time.perf_counter()
        params, opt_state, loss, grad_norm = step(params, opt_state, mb)
        metrics.append({"warm_start/step": float(i + 1), "warm_start/loss": float(loss),
                        "warm_start/grad_norm": float(grad_norm), "warm_start/step_s": time.perf_counter() - t_step,
                        "warm_start/tokens": float(np.asarray(minis["loss_mask"][i % len(micro)]).sum())})
        if loss_target_reached([m["warm_start/loss"] for m in metrics], until, len(micro)):
            break
    engine.update_params(params)
    if metrics:
        metrics[-1].update({"warm_start/entries": float(len(entry_ids)), "warm_start/replay_s": replay_s,
                            "warm_start/seconds": time.perf_counter() - t0,
                            "warm_start/row_length": float(row_length),
                            "warm_start/longest_trajectory": float(max(t.length for t in trajectories)),
                            "warm_start/logit_slots": float(slots)})
    return params, metrics
