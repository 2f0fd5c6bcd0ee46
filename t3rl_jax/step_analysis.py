"""The trainer's real train step on abstract inputs: for `--config.dry_run=True`, `scripts/fit_check.py` and
`benchmarks/cp_memory.py`. Builds mesh, model, shardings and optimizer exactly as the trainer does and allocates
nothing."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from t3rl_jax.rl.train_step import GRPOStep
from t3rl_jax.trainer import Trainer


@dataclasses.dataclass
class AbstractStep:
    """The real train step's jitted pieces with abstract (ShapeDtypeStruct) arguments: nothing allocated."""

    trainer: Trainer
    grad_fn: object          # forward + backward of one micro-batch (gradients as outputs)
    grad_args: tuple
    accumulate_fn: object    # the same, added into a donated gradient buffer (micro-batches after the first)
    accumulate_args: tuple
    apply_fn: object
    apply_args: tuple


def abstract_train_step(cfg) -> AbstractStep:
    """One micro-batch of the config's real shapes (rows x train.max_seq_len, logits at every position)."""
    trainer = Trainer(cfg)
    rows, length = trainer.rows_per_micro, cfg.train.max_seq_len
    ints = jax.ShapeDtypeStruct((rows, length), np.int32, sharding=trainer.batch_sharding)
    floats = jax.ShapeDtypeStruct((rows, length), np.float32, sharding=trainer.batch_sharding)
    mb = {"tokens": ints, "positions": ints, "segment_ids": ints, "targets": ints, "loss_mask": floats,
          "rollout_logprobs": floats, "advantages": floats}
    params = trainer.bundle.abstract_params
    step = GRPOStep(trainer.bundle.train_model(params), trainer.optimizer, trainer.step_settings,
                    param_shardings=trainer.bundle.param_shardings, opt_shardings=trainer.opt_shardings,
                    batch_sharding=trainer.batch_sharding)
    slots = length if trainer.step_settings.compact_logits else None
    denominator = jax.ShapeDtypeStruct((), np.float32)
    _, first, accumulate = step.functions_for(slots)
    return AbstractStep(trainer, first, (params, mb, floats, floats, denominator),
                        accumulate, (params, params, mb, floats, floats, denominator),
                        step._apply, (params, trainer.abstract_opt, params))


@dataclasses.dataclass
class DryRunReport:
    num_params: int
    mesh: dict
    lowered: bool


def dry_run(cfg) -> DryRunReport:
    """Build everything for the config's real shapes and lower the train step, allocating no weights."""
    step = abstract_train_step(cfg)
    step.grad_fn.lower(*step.grad_args)
    step.accumulate_fn.lower(*step.accumulate_args)
    step.apply_fn.lower(*step.apply_args)
    return DryRunReport(step.trainer.bundle.config.num_params, dict(step.trainer.mesh.shape), True)
