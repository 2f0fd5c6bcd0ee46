"""The GRPO run: TrainState (fresh or resumed) -> for each step: experience -> mini-batches -> update -> hooks ->
at the end, plots and the HF export (the best params when validation plateaued, else the last).

The engine samples from the updated parameters (same arrays) at the next step. Every episode's sampling seed is a
pure function of (run seed, step, group, sample), so a resumed run replays the same rollouts.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time

import jax
import numpy as np
from flax import nnx

from environments.bfcl.splits import write_splits
from t3rl_jax import data as data_lib
from t3rl_jax import flops as flops_lib
from t3rl_jax import distributed, model_factory, params_checkpoint, profiling
from t3rl_jax.checkpointing import Checkpointer
from t3rl_jax.config import export_dir
from t3rl_jax.envs.base import make_env_pool
from t3rl_jax.eval import bfcl as bfcl_eval
from t3rl_jax.evaluation import score_trajectories
from t3rl_jax.rl import batch_builder, experience
from t3rl_jax.rl.learner import Learner
from t3rl_jax.rl.train_step import GRPOStep
from t3rl_jax.rollout.driver import RolloutDriver, RolloutLimits, RolloutMetrics
from t3rl_jax.rollout.factory import backend_for_run
from t3rl_jax.run import artifacts, hooks as hooks_lib, multihost
from t3rl_jax.run import state as state_lib
from t3rl_jax.run.setup import RunSetup

log = logging.getLogger(__name__)
WARM_START_FILE = "warm_start.jsonl"  # one line per supervised warm-start step (metrics.jsonl holds GRPO steps)


def prompt_iterator(cfg, chat) -> data_lib.PromptIterator:
    path = os.path.join(cfg.data.splits_dir, cfg.data.train_file)
    if not os.path.exists(path):
        log.info("writing BFCL splits to %s", cfg.data.splits_dir)
        write_splits(cfg.data.splits_dir)
    records = data_lib.load_split(path, max_entries=cfg.data.max_entries, categories=tuple(cfg.data.categories),
                                  max_prompt_tokens=cfg.rollout.max_prefill_length,
                                  # the prompt the episode shows, in the run's style (a record's tools are T3RL's)
                                  prompt_tokens_fn=lambda r: bfcl_eval.prompt_tokens(data_lib.entry_id(r), chat,
                                                                                     cfg.prompt.style))
    return data_lib.PromptIterator(records, prompts_per_step=cfg.data.prompts_per_step, seed=cfg.seed,
                                   shuffle=cfg.data.shuffle)


def open_env_pool(cfg):
    """The environment pool, every worker started before anything else (one that cannot start stops the run here,
    before any state is built)."""
    return make_env_pool(cfg.env)


def make_engine(setup: RunSetup, params):
    """The rollout backend on this process's devices (one engine, or one per `rollout.slot_classes` class; the
    whole mesh on one process), built by the rollout factory as the fit check and the dry run build it."""
    return backend_for_run(setup, params, mesh=setup.local_mesh)


def token_digest(trajs) -> float:
    """48 bits of a hash of every trajectory's token ids, in order: two runs whose metrics differ rolled out the
    same episodes exactly when this agrees (it tells a nondeterministic rollout from a nondeterministic update)."""
    h = hashlib.blake2b(digest_size=6)
    for t in trajs:
        h.update(np.asarray(t.token_ids, np.int64).tobytes() + b"|")
    return float(int.from_bytes(h.digest(), "little"))


class EnvironmentBroken(RuntimeError):
    """Every episode of a step failed in the environment pool: nothing to learn from, most likely nothing will be."""


def check_environment(trajs, *, step: int, cfg) -> None:
    """Stop before any update when every episode of the step failed in the environment (a pool whose workers die at
    start-up, a broken bfcl-eval install): the error names the pool settings and the workers' first reason."""
    failed = [t for t in trajs if t.termination == experience.ENV_FAILED]
    if trajs and len(failed) == len(trajs):
        reason = failed[0].extras.get("failure_reason", "no reason recorded")
        raise EnvironmentBroken(f"step {step}: all {len(trajs)} episodes failed in the environment pool "
                                f"(env.num_workers={cfg.env.num_workers}, env.step_timeout_s={cfg.env.step_timeout_s}); "
                                f"first reason: {reason}. No update was made; the last checkpoint is unchanged.")


def rollout_metrics(trajs) -> dict:
    rewards = np.asarray([t.reward for t in trajs])
    out = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
           "episodes/token_digest": token_digest(trajs),
           "length/response_tokens": float(np.mean([t.length - t.prompt_length for t in trajs])),
           "length/sampled_tokens": float(np.mean([t.num_sampled for t in trajs])),
           "tool_calls/per_episode": float(np.mean([t.num_tool_calls for t in trajs])),
           "errors/tool_per_episode": float(np.mean([t.num_tool_errors for t in trajs])),
           "errors/format_per_episode": float(np.mean([t.num_format_errors for t in trajs])),
           "turns/per_episode": float(np.mean([t.num_turns for t in trajs]))}
    out.update({k: v for k, v in score_trajectories(trajs).items() if k.startswith(("progress/", "accuracy/"))})
    return out


def throughput(setup: RunSetup, minis: list[dict], seconds: float) -> dict:
    """Model FLOPs of the update (packed causal attention counted per segment) and MFU where the peak is known."""
    segments = np.concatenate([mb["segment_ids"].reshape(-1, mb["segment_ids"].shape[-1]) for mb in minis])
    flops = flops_lib.packed_train_flops(setup.bundle.config, segments)
    out = {"throughput/train_tokens_per_s": float((segments > 0).sum()) / seconds,
           "throughput/train_tflops_per_s": flops / seconds / 1e12}
    try:
        peak = flops_lib.peak_flops_for_device(jax.devices()[0].device_kind)
    except ValueError:  # CPU and unknown accelerators: no MFU
        return out
    out["mfu"] = flops_lib.mfu(flops / seconds / setup.mesh.size, peak)
    return out


def warm_start(setup: RunSetup, params, *, engine, pool):
    """The recipe's supervised warm start on a fresh run (cfg.warm_start.steps > 0); (params, metrics list)."""
    cfg = setup.cfg
    if "warm_start" not in cfg or not cfg.warm_start.steps:
        return params, []
    from t3rl_jax.rl import sft

    return sft.warm_start(cfg, bundle=setup.bundle, mesh=setup.mesh, param_shardings=setup.param_shardings,
                          batch_sharding=setup.batch_sharding, params=params, engine=engine, pool=pool,
                          chat=setup.chat)


def dump_hlo(workdir: str, step_fn: GRPOStep, engine, params, minis: dict) -> bool:
    """Optimised HLO of the gradient step and of the decode step, into WORKDIR/hlo/ (`dump_hlo=True`)."""
    out = os.path.join(workdir, "hlo")
    first = {k: v[0] for k, v in minis.items()}
    grad_fn = step_fn.functions_for(step_fn.slots_for(minis))[1]
    profiling.dump_hlo(grad_fn, params, first, first["rollout_logprobs"], first["rollout_logprobs"],
                       np.float32(1.0), np.bool_(False), path=os.path.join(out, "train_grad.hlo.txt"))
    profiling.dump_hlo(engine.generate_function, engine.params, engine.init_decode_state(),
                       num_steps=RolloutLimits.decode_steps_per_call, path=os.path.join(out, "decode.hlo.txt"))
    return True


class Run:
    def __init__(self, setup: RunSetup):
        self.setup, self.cfg = setup, setup.cfg
        self._dumped = False

    def start_state(self, ckpt: Checkpointer, prompts, *, engine_for, pool):
        """(TrainState, engine, resumed) - restored whole from the newest readable checkpoint, or fresh: initial
        params, warm start, then the reference policy copied from the result and a new optimizer state."""
        setup = self.setup
        if self.cfg.resume == "auto" and ckpt.all_steps():
            state, skipped = state_lib.restore(ckpt, setup)
            for step, why in skipped:
                log.warning("skipped damaged checkpoint step %d: %s", step, why)
            prompts.set_state(state.data)
            log.info("resumed from step %d", state.step)
            return state, engine_for(state.params), True
        params = model_factory.init_params(self.cfg, setup.bundle)
        engine = engine_for(params)
        params, warm_metrics = warm_start(setup, params, engine=engine, pool=pool)
        artifacts.write_jsonl(os.path.join(self.cfg.workdir, WARM_START_FILE), warm_metrics)
        engine.update_params(params)
        opt_state = jax.jit(setup.optimizer.init, out_shardings=setup.opt_shardings)(params)
        reference = state_lib.copy_tree(params) if setup.step_settings.loss.needs_reference else None
        return state_lib.TrainState(0, params, opt_state, reference, prompts.get_state()), engine, False

    def one_step(self, state, prompts, driver, learner, engine) -> dict:
        cfg, setup = self.cfg, self.setup
        t0 = time.perf_counter()
        calls = []

        def rollout(requests):  # this host's groups on its engine (which holds state.params); all hosts' back
            calls.append(len(requests))
            if len(calls) == 1:
                driver.metrics = RolloutMetrics()  # also on a host that has no group in this step
            return distributed.run_shared(lambda mine: driver.run(mine, reset_metrics=False), requests)

        with profiling.scope("rollout"):
            exp = experience.collect(cfg, state.step, prompts, rollout)
        t_rollout = time.perf_counter() - t0
        check_environment(exp.trajectories, step=state.step, cfg=cfg)
        summary, env_s = multihost.rollout_summary(driver)
        metrics = {**rollout_metrics(exp.trajectories), **summary, **exp.stats}
        minis, stats = batch_builder.build(exp.groups, cfg, rows_per_micro=setup.rows_per_micro, cp=setup.cp)
        metrics.update(stats)
        t1 = time.perf_counter()
        if minis is not None:
            if cfg.dump_hlo and not self._dumped:
                self._dumped = dump_hlo(cfg.workdir, learner.step_fn, engine, state.params, minis[0])
            with profiling.scope("train"):
                state.params, state.opt_state, train_metrics = learner.update(state.params, state.opt_state,
                                                                              state.reference, minis)
            hooks_lib.kill_point("update", state.step + 1)
            engine.update_params(state.params)
            metrics.update(train_metrics)
            metrics.update(throughput(setup, minis, time.perf_counter() - t1))
            state.nan_streak = state.nan_streak + 1 if train_metrics["skipped_nonfinite"] else 0
        state.step += 1
        state.data = prompts.get_state()
        metrics.update({"time/rollout_s": t_rollout, "time/train_s": time.perf_counter() - t1,
                        "time/env_s": env_s, "time/step_s": time.perf_counter() - t0,
                        "epoch": prompts.epoch, "nan_streak": state.nan_streak})
        return metrics

    def run(self) -> dict:
        cfg, setup = self.cfg, self.setup
        artifacts.write_model_config(cfg.workdir, setup.bundle.config)
        prompts = prompt_iterator(cfg, setup.chat)
        # Before the warm start: a validation split that the prefill cannot hold stops the run here.
        val_ids = hooks_lib.validation_ids(cfg, setup.chat) if cfg.eval.every_steps else []
        ckpt = Checkpointer(os.path.join(cfg.workdir, "checkpoints"), keep=cfg.checkpoint.keep,
                            async_save=cfg.checkpoint.async_save)
        hooks: list[hooks_lib.Hook] = []
        stop = ""
        try:
            with open_env_pool(cfg) as pool:
                state, engine, resumed = self.start_state(
                    ckpt, prompts, engine_for=lambda p: multihost.host_engine(setup, p, make_engine), pool=pool)
                validation = hooks_lib.Validation(cfg, engine=engine, pool=pool, chat=setup.chat,
                                                  model_config=setup.bundle.config, entry_ids=val_ids)
                # In this order: a stop request and the validation result reach the metrics and the checkpoint.
                hooks = [hooks_lib.Sigterm(), validation,
                         hooks_lib.Metrics(cfg, resume_step=state.step if resumed else None),
                         hooks_lib.NanGuard(cfg, ckpt), hooks_lib.Checkpoint(cfg, ckpt), hooks_lib.Profile(cfg)]
                learner = Learner(multihost.train_step(setup, state.params), setup.step_settings)
                driver = RolloutDriver(engine, pool, setup.chat,
                                       limits=hooks_lib.rollout_limits(cfg, cfg.rollout.max_steps_per_turn))
                if cfg.eval.plateau_patience and state.best.since >= cfg.eval.plateau_patience:
                    stop = "plateau"  # resumed from the checkpoint the plateau stop wrote: the stage is over
                while not stop and state.step < cfg.train.num_steps:
                    with contextlib.ExitStack() as scopes:
                        for hook in hooks:
                            scopes.enter_context(hook.step_scope(state.step))
                        metrics = self.one_step(state, prompts, driver, learner, engine)
                    end = hooks_lib.StepEnd(state.step, state, metrics, last=state.step == cfg.train.num_steps)
                    for hook in hooks:
                        hook.after_step(end)
                    stop = end.stop
                    if stop:
                        log.warning("stopping at step %d (%s); checkpoint written", state.step, stop)
        finally:
            for hook in reversed(hooks):  # also on errors: a pending async save must reach the disk
                hook.close()
            ckpt.close()
        artifacts.plots(cfg.workdir)
        if stop != "sigterm":
            self.export(state, best=stop == "plateau")
        # The primary's plots and export can outlast the timeout of jax.distributed's shutdown barrier, which a peer
        # that went straight to exit would otherwise be waiting in; this one waits up to BARRIER_TIMEOUT_S.
        distributed.barrier("run_finished")
        return {"step": state.step, "stop": stop, **validation.last}

    def export(self, state, *, best: bool) -> str:
        params = state.params
        if best and state.best.step >= 0:
            log.info("exporting the best params (step %d, val accuracy %.4f)", state.best.step, state.best.score)
            pure = params_checkpoint.load_params(os.path.join(self.cfg.workdir, hooks_lib.BEST_DIR),
                                                 nnx.to_pure_dict(self.setup.bundle.abstract_params))
            params = jax.tree.map(lambda x: x, self.setup.bundle.abstract_params)
            nnx.replace_by_pure_dict(params, pure)
        return artifacts.export_hf(params, self.setup.bundle.config, export_dir(self.cfg.workdir),
                                   dtype=self.cfg.model.dtype, init_from=self.cfg.init_from)


def train(setup: RunSetup) -> dict:
    return Run(setup).run()
