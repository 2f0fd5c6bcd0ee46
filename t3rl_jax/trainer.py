"""The GRPO loop: prompts -> rollouts (JetStream engine + BFCL env pool) -> rewards -> group advantages -> packed
micro-batches -> update -> the engine samples from the new parameters (same arrays) -> metrics -> checkpoint.

Exact resume: parameters, optimizer state, the data iterator and counters are checkpointed; every episode's
sampling seed is a pure function of (run seed, step, group, sample), so a resumed run replays the same rollouts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from environments.bfcl.pool import EnvPool
from environments.bfcl.splits import write_splits
from t3rl_jax import data as data_lib
from t3rl_jax import model_factory
from t3rl_jax import sharding as sh
from t3rl_jax.chat_format import ChatEncoder
from t3rl_jax.checkpointing import Checkpointer, SigtermFlag
from t3rl_jax.config import export_dir
from t3rl_jax import flops as flops_lib
from t3rl_jax import profiling
from t3rl_jax.evaluation import category_of, score_trajectories
from t3rl_jax.metrics import MetricsLogger
from t3rl_jax.models import hf_io
from t3rl_jax.models.context_parallel import load_balance_batch
from t3rl_jax.plots import plot_metrics
from t3rl_jax.rl import batching
from t3rl_jax.rl.advantages import group_advantages
from t3rl_jax.rl.group_filter import has_reward_variance, top_up_groups
from t3rl_jax.rl.grpo import LossSettings
from t3rl_jax.rl.train_step import GRPOStep, StepSettings, make_optimizer, micro_batch
from t3rl_jax.rollout.driver import EpisodeRequest, RolloutDriver, RolloutLimits
from t3rl_jax.rollout.engine import Qwen3Engine, SamplingSettings
from t3rl_jax.tokenizer import load_tokenizer

log = logging.getLogger(__name__)
MAX_REFILL_ROUNDS = 2  # extra prompt batches a step may roll out to replace zero-variance groups


class TrainingStopped(RuntimeError):
    """Too many consecutive non-finite updates; the last good checkpoint is kept."""


def episode_seed(run_seed: int, step: int, group: int, sample: int) -> int:
    digest = hashlib.blake2b(f"{run_seed}/{step}/{group}/{sample}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class Trainer:
    def __init__(self, cfg, *, devices=None):
        # `devices`: compile-only accelerator devices for the fit check (t3rl_jax/accel); default jax.devices().
        self.cfg = cfg
        sh.initialize_distributed(cfg.mesh)
        self.mesh = sh.make_mesh(cfg.mesh, devices)
        # Weights shard over fsdp x sequence: context-parallel devices hold distinct weight shards instead of
        # copies (stage 2's 8 devices then split params and Adam state 8 ways, not 2).
        self.rules = sh.logical_axis_rules(fsdp_over_sequence=True)
        arch = model_factory.model_config(cfg)
        sh.validate(self.mesh, seq_len=cfg.train.max_seq_len, num_heads=arch.num_heads,
                    num_kv_heads=arch.num_kv_heads, rules=self.rules)
        self.bundle = model_factory.build(cfg, self.mesh, self.rules)
        self.tokenizer = load_tokenizer(cfg.init_from if model_factory.is_hf_dir(cfg.init_from) else None)
        self.chat = ChatEncoder(self.tokenizer)
        self.optimizer = make_optimizer(cfg.train)
        self.cp = self.mesh.shape["sequence"]
        self.rows_per_micro = cfg.train.micro_batch_size
        shards = sh.axis_size(self.mesh, ("data", "fsdp"))
        if self.rows_per_micro % shards:
            raise ValueError(f"train.micro_batch_size={self.rows_per_micro} is not divisible by the data x fsdp "
                             f"devices ({shards})")
        batch_spec = sh.logical_to_spec(("batch", "length"), self.rules, mesh=self.mesh)
        self.batch_sharding = NamedSharding(self.mesh, batch_spec)
        self.step_settings = StepSettings(LossSettings.from_algo_config(cfg.algo),
                                          temperature=max(cfg.rollout.temperature, 1e-6),
                                          old_logprobs=cfg.algo.old_logprobs, compact_logits=self.cp == 1)
        abstract_opt = jax.eval_shape(self.optimizer.init, self.bundle.abstract_params)
        self.opt_shardings = sh.optax_state_shardings(abstract_opt, self.bundle.abstract_params,
                                                      self.bundle.param_shardings, self.mesh)
        self.abstract_opt = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                         abstract_opt, self.opt_shardings)

    # ------------------------------------------------------------------ setup that allocates
    def _data(self):
        cfg = self.cfg
        path = os.path.join(cfg.data.splits_dir, cfg.data.train_file)
        if not os.path.exists(path):
            log.info("writing BFCL splits to %s", cfg.data.splits_dir)
            write_splits(cfg.data.splits_dir)

        def prompt_tokens(record):
            return len(self.chat.prompt_ids(record["prompt"], record["metadata"]["tools"]))

        records = data_lib.load_split(path, max_entries=cfg.data.max_entries, categories=tuple(cfg.data.categories),
                                      max_prompt_tokens=cfg.rollout.max_prefill_length,
                                      prompt_tokens_fn=prompt_tokens)
        if not records:
            raise ValueError(f"no record of {path} fits rollout.max_prefill_length={cfg.rollout.max_prefill_length}")
        return data_lib.PromptIterator(records, prompts_per_step=cfg.data.prompts_per_step, seed=cfg.seed,
                                       shuffle=cfg.data.shuffle)

    def _val_ids(self) -> list[str]:
        cfg = self.cfg
        path = os.path.join(cfg.data.splits_dir, cfg.data.val_file)
        if not os.path.exists(path):
            write_splits(cfg.data.splits_dir)
        records = data_lib.load_split(path, max_entries=cfg.eval.max_entries, categories=tuple(cfg.data.categories),
                                      max_prompt_tokens=cfg.rollout.max_prefill_length,
                                      prompt_tokens_fn=lambda r: len(self.chat.prompt_ids(r["prompt"],
                                                                                          r["metadata"]["tools"])))
        return [data_lib.entry_id(r) for r in records]

    def _engine(self, params) -> Qwen3Engine:
        r = self.cfg.rollout
        return Qwen3Engine(self.bundle.rollout_model(params), tokenizer=self.tokenizer,
                           max_concurrent_decodes=r.max_concurrent_decodes, max_prefill_length=r.max_prefill_length,
                           max_cache_length=r.max_context_tokens,
                           sampling=SamplingSettings(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k),
                           cache_dtype=jax.numpy.dtype(self.cfg.model.dtype),
                           mesh=self.mesh, seed=self.cfg.seed)

    def _limits(self, steps_per_turn: int) -> RolloutLimits:
        r = self.cfg.rollout
        return RolloutLimits(max_steps_per_turn=steps_per_turn, max_model_calls=r.max_model_calls,
                             max_response_tokens=r.max_response_tokens, max_context_tokens=r.max_context_tokens,
                             prefill_tokens_per_call=r.prefill_tokens_per_call)

    # ------------------------------------------------------------------ one step
    def _requests(self, step: int, prompts: list[dict], first_group: int = 0) -> list[EpisodeRequest]:
        cfg = self.cfg
        out = []
        for g, record in enumerate(prompts, start=first_group):
            eid = data_lib.entry_id(record)
            for s in range(cfg.rollout.samples_per_prompt):
                out.append(EpisodeRequest(eid, group_id=g, sample_index=s, seed=episode_seed(cfg.seed, step, g, s),
                                          augment=cfg.env.augment, reward_kind=cfg.env.reward,
                                          category=category_of(eid)))
        return out

    def _rollout_groups(self, step: int, prompts, driver: RolloutDriver, params):
        """GRPO groups for one step -> (groups to train on, every trajectory rolled out, stats).

        With the zero-variance filter on, groups whose samples all scored the same are dropped (their advantages
        would be 0); with `algo.refill_groups` more prompts are rolled out, at most MAX_REFILL_ROUNDS batches,
        until `data.prompts_per_step` groups have reward variance.
        """
        cfg = self.cfg
        n = cfg.rollout.samples_per_prompt
        first = next(prompts)
        trajs = driver.run(self._requests(step, first), params)
        every = list(trajs)
        groups = [trajs[g * n:(g + 1) * n] for g in range(len(first))]
        if not cfg.algo.filter_zero_variance:
            return groups, every, {"groups/kept": float(len(groups)), "groups/dropped": 0.0}
        varied = has_reward_variance(np.asarray([[t.reward for t in g] for g in groups], np.float32))
        kept = [g for g, v in zip(groups, varied) if v]
        stats = {"groups/dropped": float(len(groups) - len(kept))}
        if cfg.algo.refill_groups:
            def extras():
                offset = len(first)
                for _ in range(MAX_REFILL_ROUNDS):
                    more = next(prompts)
                    rolled = driver.run(self._requests(step, more, first_group=offset), params,
                                        reset_metrics=False)
                    every.extend(rolled)
                    offset += len(more)
                    yield from (rolled[g * n:(g + 1) * n] for g in range(len(more)))

            topped = top_up_groups(kept, extras(), cfg.data.prompts_per_step,
                                   rewards_of=lambda group: [t.reward for t in group])
            kept = topped.groups
            stats.update({"groups/refill_drawn": float(topped.num_drawn),
                          "groups/refill_rejected": float(topped.num_rejected)})
        stats["groups/kept"] = float(len(kept))
        return kept, every, stats

    def _batch(self, groups):
        """Kept GRPO groups -> mini-batches of packed micro-batches (None when no group is left)."""
        cfg = self.cfg
        if not groups:
            return None, {}
        n = cfg.rollout.samples_per_prompt
        rewards = np.asarray([[t.reward for t in g] for g in groups], np.float32)
        adv = np.asarray(group_advantages(jax.numpy.asarray(rewards), mode=cfg.algo.advantage,
                                          eps=cfg.algo.adv_eps)).reshape(len(groups), n)
        # Mini-batches split whole groups, so each optimizer step sees complete GRPO groups.
        parts = [p for p in np.array_split(np.arange(len(groups)), cfg.train.mini_batches_per_step) if len(p)]
        minis, truncated, padding = [], 0, []
        for part in parts:
            kept = [t for i in part for t in groups[i]]
            packed = batching.pack(kept, adv[part].reshape(-1), row_length=cfg.train.max_seq_len,
                                   pad_rows_to_multiple=self.rows_per_micro)
            arrays = packed.as_dict()
            if self.cp > 1:
                arrays = load_balance_batch(arrays, self.cp)
            minis.append(micro_batch(arrays, packed.tokens.shape[0] // self.rows_per_micro))
            truncated += packed.num_truncated
            padding.append(float(1.0 - (packed.segment_ids > 0).mean()))
        stats = {"length/truncated_episodes": float(truncated), "length/padding_fraction": float(np.mean(padding))}
        return minis, stats

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        cfg = self.cfg
        os.makedirs(cfg.workdir, exist_ok=True)
        # Checkpoints hold arrays only; this makes a run directory self-describing for eval/serve/export.
        with open(os.path.join(cfg.workdir, "model_config.json"), "w") as f:
            f.write(self.bundle.config.to_json())
        prompts = self._data()
        ckpt = Checkpointer(os.path.join(cfg.workdir, "checkpoints"), keep=cfg.checkpoint.keep,
                            async_save=cfg.checkpoint.async_save)
        start, nan_streak = 0, 0
        best, since_best = -1.0, 0  # validation accuracy plateau tracking (checkpointed)
        resume_step = ckpt.latest_step() if cfg.resume == "auto" else None
        if resume_step is not None:
            start, params, opt_state, extra = ckpt.restore(abstract_params=nnx.to_pure_dict(
                self.bundle.abstract_params), abstract_opt_state=self.abstract_opt)
            params = self._state_from_pure(params)
            prompts.set_state(extra["data"])
            nan_streak = int(extra.get("nan_streak", 0))
            best, since_best = float(extra.get("best_val", -1.0)), int(extra.get("since_best", 0))
            log.info("resumed from step %d", start)
        else:
            params = model_factory.init_params(cfg, self.bundle)
            opt_state = jax.jit(self.optimizer.init, out_shardings=self.opt_shardings)(params)
        logger = MetricsLogger(cfg.workdir, config_dict=cfg.to_dict(), wandb_mode=cfg.log.wandb_mode,
                               project=cfg.log.wandb_project, run_name=cfg.stage, resume_step=resume_step,
                               total_steps=cfg.train.num_steps)
        step_fn = GRPOStep(self.bundle.train_model(params), self.optimizer, self.step_settings,
                           param_shardings=self.bundle.param_shardings, opt_shardings=self.opt_shardings,
                           batch_sharding=self.batch_sharding)
        ref_params = jax.tree.map(lambda x: x.copy(), params) if self.step_settings.loss.needs_reference else None
        engine = self._engine(params)
        session = profiling.ProfileSession(cfg.workdir, start_step=cfg.profile.start_step,
                                           num_steps=cfg.profile.num_steps, port=cfg.profile.port)
        try:
            step, last_val, stop = self._loop(start, params, opt_state, prompts, ckpt, logger, session, step_fn,
                                              ref_params, engine, nan_streak, best, since_best)
        finally:
            # Also on errors (e.g. TrainingStopped): a pending async save must reach the disk.
            ckpt.close()
            logger.close()
        if jax.process_index() == 0:
            plot_metrics(cfg.workdir)
        if not stop:
            self.export(engine.params)
        return {"step": step, **last_val}

    def _loop(self, start, params, opt_state, prompts, ckpt, logger, session, step_fn, ref_params, engine,
              nan_streak, best, since_best):
        cfg = self.cfg
        last_val: dict = {}
        with EnvPool(cfg.env.num_workers, step_timeout_s=cfg.env.step_timeout_s) as pool, SigtermFlag() as stop, \
                session:
            driver = RolloutDriver(engine, pool, self.chat, limits=self._limits(cfg.rollout.max_steps_per_turn))
            step = start
            while step < cfg.train.num_steps:
                with session.step(step):
                    t0 = time.perf_counter()
                    with profiling.scope("rollout"):
                        groups, trajs, group_stats = self._rollout_groups(step, prompts, driver, params)
                    t_rollout = time.perf_counter() - t0
                    metrics = self._rollout_metrics(trajs)
                    metrics.update(driver.metrics.summary())
                    metrics.update(group_stats)
                    batch, stats = self._batch(groups)
                    metrics.update(stats)
                    t1 = time.perf_counter()
                    if batch is not None:
                        if cfg.dump_hlo and step == start:
                            self._dump_hlo(step_fn, engine, params, batch[0])
                        with profiling.scope("train"):
                            params, opt_state, train_metrics = self._update(step_fn, params, opt_state, ref_params,
                                                                            batch)
                        engine.update_params(params)
                        metrics.update(train_metrics)
                        metrics.update(self._throughput(batch, time.perf_counter() - t1))
                        nan_streak = nan_streak + 1 if train_metrics["skipped_nonfinite"] else 0
                step += 1
                metrics.update({"time/rollout_s": t_rollout, "time/train_s": time.perf_counter() - t1,
                                "time/env_s": driver.metrics.env_seconds, "time/step_s": time.perf_counter() - t0,
                                "epoch": prompts.epoch, "nan_streak": nan_streak})
                if nan_streak >= cfg.train.max_nan_steps:
                    logger.log(step, metrics)
                    raise TrainingStopped(f"{nan_streak} consecutive non-finite updates (train.max_nan_steps="
                                          f"{cfg.train.max_nan_steps}); last good checkpoint: step "
                                          f"{ckpt.latest_step()}")
                if cfg.eval.every_steps and (step % cfg.eval.every_steps == 0 or step == cfg.train.num_steps):
                    with profiling.scope("eval"):
                        last_val = self.validate(engine, pool, params)
                    metrics.update(last_val)
                    if last_val["val/accuracy/overall"] > best:
                        best, since_best = last_val["val/accuracy/overall"], 0
                    else:
                        since_best += 1
                logger.log(step, metrics)
                plateau = cfg.eval.plateau_patience and since_best >= cfg.eval.plateau_patience
                periodic = cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0
                if periodic or step == cfg.train.num_steps or stop or plateau:
                    with profiling.scope("checkpoint"):
                        ckpt.save(step, params=nnx.to_pure_dict(params), opt_state=opt_state,
                                  extra={"data": prompts.get_state(), "nan_streak": nan_streak, "best_val": best,
                                         "since_best": since_best})
                if stop:
                    log.warning("SIGTERM: checkpoint written at step %d, exiting", step)
                    break
                if plateau:
                    log.info("validation accuracy plateaued for %d evaluations; ending the stage", since_best)
                    break
        return step, last_val, bool(stop)

    def _update(self, step_fn: GRPOStep, params, opt_state, ref_params, minis: list[dict]):
        """One optimizer step per mini-batch; the PPO anchor is the policy that generated the rollouts, so
        trainer-side old log-probs are computed for every mini-batch before the first update."""
        olds = [None] * len(minis)
        if self.step_settings.old_logprobs == "trainer":
            olds = [step_fn.logprobs(params, mb) for mb in minis]
        refs = [step_fn.logprobs(ref_params, mb) if ref_params is not None else None for mb in minis]
        collected = []
        for mb, old, ref in zip(minis, olds, refs):
            params, opt_state, m = step_fn.update(params, opt_state, mb, old_logprobs=old, ref_logprobs=ref)
            collected.append(m)
        merged = {k: float(np.mean([m[k] for m in collected])) for k in collected[0]}
        merged["skipped_nonfinite"] = float(max(m["skipped_nonfinite"] for m in collected))
        return params, opt_state, merged

    def _throughput(self, minis: list[dict], seconds: float) -> dict:
        """Model FLOPs of the update (packed causal attention counted per segment) and MFU where the peak is
        known (H100 / H200); the old-log-prob pass is not counted."""
        segments = np.concatenate([mb["segment_ids"].reshape(-1, mb["segment_ids"].shape[-1]) for mb in minis])
        flops = flops_lib.packed_train_flops(self.bundle.config, segments)
        out = {"throughput/train_tokens_per_s": float((segments > 0).sum()) / seconds,
               "throughput/train_tflops_per_s": flops / seconds / 1e12}
        try:
            peak = flops_lib.peak_flops_for_device(jax.devices()[0].device_kind)
        except ValueError:  # CPU and unknown accelerators: no MFU
            return out
        out["mfu"] = flops_lib.mfu(flops / seconds / self.mesh.size, peak)
        return out

    def _dump_hlo(self, step_fn: GRPOStep, engine: Qwen3Engine, params, minis: dict) -> None:
        """Optimised HLO of the gradient step and of the decode step, into WORKDIR/hlo/."""
        out = os.path.join(self.cfg.workdir, "hlo")
        first = {k: v[0] for k, v in minis.items()}
        grad_fn = step_fn.functions_for(step_fn.slots_for(minis))[1]
        profiling.dump_hlo(grad_fn, params, first, first["rollout_logprobs"], first["rollout_logprobs"],
                           np.float32(1.0), path=os.path.join(out, "train_grad.hlo.txt"))
        profiling.dump_hlo(engine.generate_function, params, engine.init_decode_state(),
                           num_steps=RolloutLimits.decode_steps_per_call, path=os.path.join(out, "decode.hlo.txt"))

    def _state_from_pure(self, pure):
        params = jax.tree.map(lambda x: x, self.bundle.abstract_params)
        nnx.replace_by_pure_dict(params, pure)
        return params

    def _rollout_metrics(self, trajs) -> dict:
        rewards = np.asarray([t.reward for t in trajs])
        out = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
               "length/response_tokens": float(np.mean([t.length - t.prompt_length for t in trajs])),
               "length/sampled_tokens": float(np.mean([t.num_sampled for t in trajs])),
               "tool_calls/per_episode": float(np.mean([t.num_tool_calls for t in trajs])),
               "errors/tool_per_episode": float(np.mean([t.num_tool_errors for t in trajs])),
               "errors/format_per_episode": float(np.mean([t.num_format_errors for t in trajs])),
               "turns/per_episode": float(np.mean([t.num_turns for t in trajs]))}
        for name, value in score_trajectories(trajs).items():
            if name.startswith(("progress/", "accuracy/")):
                out[name] = value
        return out

    def validate(self, engine: Qwen3Engine, pool, params) -> dict:
        """Greedy episodes on the validation split; per-category accuracy and progress under `val/`."""
        cfg = self.cfg
        ids = self._val_ids()
        requests = [EpisodeRequest(e, group_id=i, seed=0, augment=cfg.env.augment, reward_kind="progress",
                                   category=category_of(e)) for i, e in enumerate(ids)]
        greedy = SamplingSettings(temperature=0.0 if cfg.eval.greedy else cfg.rollout.temperature,
                                  top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k)
        driver = RolloutDriver(engine, pool, self.chat, limits=self._limits(cfg.eval.max_steps_per_turn),
                               sampling=greedy)
        scores = score_trajectories(driver.run(requests, params))
        return {f"val/{k}": v for k, v in scores.items()}

    def export(self, params) -> str:
        out = export_dir(self.cfg.workdir)
        pure = jax.tree.map(np.asarray, nnx.to_pure_dict(params))
        # The compute dtype: bf16 for the real model (as Qwen ships it), f32 for tiny CPU runs.
        hf_io.export_hf_dir(pure, self.bundle.config, out, dtype=self.cfg.model.dtype,
                            assets=hf_io.default_tokenizer_files())
        return out
