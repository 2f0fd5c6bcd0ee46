"""What happens around each training step besides the step itself: validation (with keep-best and the plateau stop),
checkpoints, metrics, profiling, SIGTERM, and the non-finite-update guard. The loop calls every hook in order after
each step; a hook may end the run by setting `StepEnd.stop`.

Validation goes through `validate` only (one place to swap in the shared BFCL evaluator): the `eval.split` file,
greedy or sampled per `eval.greedy`, no hints (augment=False), and a per-entry seed derived from (run seed, step,
entry id).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil

import jax
from flax import nnx

from t3rl_jax import data as data_lib
from t3rl_jax import distributed, params_checkpoint, profiling
from t3rl_jax.checkpointing import KILL_ENV, Checkpointer, SigtermFlag, kill_point  # noqa: F401 - kill_point: loop
from t3rl_jax.metrics import MetricsLogger
from t3rl_jax.eval import bfcl as bfcl_eval
from t3rl_jax.rollout.driver import EpisodeRequest, RolloutLimits
from t3rl_jax.rollout.engine import SamplingSettings
from t3rl_jax.run import state as state_lib

log = logging.getLogger(__name__)
BEST_DIR = "best"
SPLIT_FILES = {"test": "bfcl_test.jsonl"}  # eval.split -> file in data.splits_dir ("val": data.val_file)
# Tests only (KILL_ENV, checkpointing.kill_point): "update:N" SIGKILLs the run right after step N's update, "save:N"
# right after step N's checkpoint save was issued (at tiny sizes the async save has usually committed by then),
# "commit:N" from inside Orbax's commit of step N (checkpointing.py), before the step is on disk.


class TrainingStopped(RuntimeError):
    """Too many consecutive non-finite updates; the last good checkpoint is kept."""


@dataclasses.dataclass
class StepEnd:
    step: int                   # optimizer steps done (1 after the first)
    state: state_lib.TrainState
    metrics: dict
    last: bool                  # step == train.num_steps
    stop: str = ""              # why the run ends here ("sigterm", "plateau"); "" = go on


class Hook:
    def step_scope(self, step: int):
        return contextlib.nullcontext()

    def after_step(self, end: StepEnd) -> None:
        pass

    def close(self) -> None:
        pass


def rollout_limits(cfg, steps_per_turn: int) -> RolloutLimits:
    r = cfg.rollout
    return RolloutLimits(max_steps_per_turn=steps_per_turn, max_model_calls=r.max_model_calls,
                         max_response_tokens=r.max_response_tokens, max_context_tokens=r.max_context_tokens,
                         prefill_tokens_per_call=r.prefill_tokens_per_call)


def validation_seed(run_seed: int, step: int) -> int:
    """The evaluation seed of step `step`'s validation (each entry derives its own from it)."""
    digest = hashlib.blake2b(f"val/{run_seed}/{step}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def validation_ids(cfg, chat) -> list[str]:
    """Entry ids of the `eval.split` file that fit the prefill (in file order, cut to eval.max_entries)."""
    name = cfg.data.val_file if cfg.eval.split == "val" else SPLIT_FILES[cfg.eval.split]
    records = data_lib.load_split(os.path.join(cfg.data.splits_dir, name), max_entries=cfg.eval.max_entries,
                                  categories=tuple(cfg.data.categories),
                                  max_prompt_tokens=cfg.rollout.max_prefill_length,
                                  prompt_tokens_fn=lambda r: bfcl_eval.prompt_tokens(data_lib.entry_id(r), chat,
                                                                                     cfg.eval.prompt_style))
    return [data_lib.entry_id(r) for r in records]


def validation_requests(cfg, entry_ids: list[str], step: int) -> list[EpisodeRequest]:
    """One episode per entry: progress reward, no hints, its own seed (what `validate` runs)."""
    return bfcl_eval.eval_requests(entry_ids, seed=validation_seed(cfg.seed, step), prompt_style=cfg.eval.prompt_style)


def validate(cfg, *, engine, pool, chat, params, entry_ids: list[str], step: int) -> dict:
    """Per-category accuracy and progress under `val/`: scripts/eval_bfcl.py's evaluation (t3rl_jax/eval/bfcl.py)
    on the eval.split entries, with the eval.* limits and the training engine."""
    sampling = SamplingSettings(temperature=0.0 if cfg.eval.greedy else cfg.rollout.temperature,
                                top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k)
    report = bfcl_eval.evaluate(engine=engine, pool=pool, chat=chat, entry_ids=entry_ids,
                                limits=bfcl_eval.validation_limits(cfg), sampling=sampling,
                                prompt_style=cfg.eval.prompt_style, seed=validation_seed(cfg.seed, step),
                                params=params)
    return {f"val/{k}": v for k, v in report.scores.items()}


class Validation(Hook):
    """Every eval.every_steps steps and at the last: validate, keep the best params in WORKDIR/best, and stop the
    stage after eval.plateau_patience evaluations without a new best."""

    def __init__(self, cfg, *, engine, pool, chat, model_config, entry_ids):
        # entry_ids: validation_ids(cfg, chat), read by the caller before the warm start (a bad split stops early)
        self.cfg, self.engine, self.pool, self.chat, self.model_config = cfg, engine, pool, chat, model_config
        self.entry_ids = list(entry_ids)
        self.best_dir = os.path.join(cfg.workdir, BEST_DIR)
        self.last: dict = {}

    def after_step(self, end: StepEnd) -> None:
        cfg = self.cfg
        if not cfg.eval.every_steps or not (end.step % cfg.eval.every_steps == 0 or end.last):
            return
        with profiling.scope("eval"):
            # The engine holds end.state.params already (on this host's devices when multi-host).
            self.last = validate(cfg, engine=self.engine, pool=self.pool, chat=self.chat, params=None,
                                 entry_ids=self.entry_ids, step=end.step)
        end.metrics.update(self.last)
        best = end.state.best
        score = self.last["val/accuracy/overall"]
        if score > best.score:
            end.state.best = state_lib.Best(score=score, step=end.step, since=0)
            self._keep(end.state.params, end.step)
        else:
            best.since += 1
        end.metrics["val/best_accuracy"] = end.state.best.score
        if cfg.eval.plateau_patience and end.state.best.since >= cfg.eval.plateau_patience:
            log.info("validation accuracy plateaued for %d evaluations (best %.4f at step %d); ending the stage",
                     end.state.best.since, end.state.best.score, end.state.best.step)
            end.stop = end.stop or "plateau"

    def _keep(self, params, step: int) -> None:
        """WORKDIR/best <- params, replaced whole (a kill mid-write leaves the previous best)."""
        tmp = self.best_dir + ".tmp"
        if jax.process_index() == 0 and os.path.exists(tmp):
            shutil.rmtree(tmp)
        distributed.barrier("best_tmp_cleared")  # no peer starts writing into the old tmp before it is gone
        params_checkpoint.save_params(tmp, nnx.to_pure_dict(params), config=self.model_config, force=True)
        distributed.barrier("best_tmp_written")  # the rename waits for every process's part of the tmp
        if jax.process_index() == 0:
            with open(os.path.join(tmp, "best_step"), "w") as f:
                f.write(str(step))
            if os.path.exists(self.best_dir):
                shutil.rmtree(self.best_dir)
            os.replace(tmp, self.best_dir)
        distributed.barrier("best_params_kept")  # peers read WORKDIR/best (a plateau export) only once it is there


class Sigterm(Hook):
    def __init__(self):
        self.flag = SigtermFlag()

    def after_step(self, end: StepEnd) -> None:
        if distributed.any_process(bool(self.flag)):  # a SIGTERM on any host stops every host after this step
            end.stop = end.stop or "sigterm"

    def close(self) -> None:
        self.flag.close()


class Metrics(Hook):
    """metrics.jsonl / wandb every log.every_steps steps, and at the last step, a stop and every validation."""

    def __init__(self, cfg, *, resume_step: int | None):
        self.cfg = cfg
        self.logger = MetricsLogger(cfg.workdir, config_dict=cfg.to_dict(), wandb_mode=cfg.log.wandb_mode,
                                    project=cfg.log.wandb_project, run_name=cfg.stage, resume_step=resume_step,
                                    total_steps=cfg.train.num_steps, is_primary=jax.process_index() == 0)

    def after_step(self, end: StepEnd) -> None:
        due = end.step % self.cfg.log.every_steps == 0 or end.last or end.stop
        if due or any(k.startswith("val/") for k in end.metrics):
            self.logger.log(end.step, end.metrics)

    def close(self) -> None:
        self.logger.close()


class NanGuard(Hook):
    def __init__(self, cfg, ckpt: Checkpointer):
        self.max_steps, self.ckpt = cfg.train.max_nan_steps, ckpt

    def after_step(self, end: StepEnd) -> None:
        if end.state.nan_streak >= self.max_steps:
            raise TrainingStopped(f"{end.state.nan_streak} consecutive non-finite updates (train.max_nan_steps="
                                  f"{self.max_steps}); last good checkpoint: step {self.ckpt.latest_step()}")


class Checkpoint(Hook):
    """The whole TrainState every checkpoint.every_steps steps, at the last step and when the run stops early."""

    def __init__(self, cfg, ckpt: Checkpointer):
        self.every, self.ckpt = cfg.checkpoint.every_steps, ckpt

    def after_step(self, end: StepEnd) -> None:
        if (self.every and end.step % self.every == 0) or end.last or end.stop:
            with profiling.scope("checkpoint"):
                state_lib.save(self.ckpt, end.state)
            kill_point("save", end.step)


class Profile(Hook):
    def __init__(self, cfg):
        self.session = profiling.ProfileSession(cfg.workdir, start_step=cfg.profile.start_step,
                                                num_steps=cfg.profile.num_steps, port=cfg.profile.port)

    def step_scope(self, step: int):
        return self.session.step(step)

    def close(self) -> None:
        self.session.close()
