"""Every jitted function a training run executes, on abstract inputs with the run's real shapes and shardings:
for `--config.dry_run=True`, `scripts/fit_check.py` and `benchmarks/cp_memory.py`. Builds mesh, model, shardings,
optimizer and rollout engine exactly as the run does (on the CPU's devices or a compile-only accelerator target's)
and allocates nothing."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from t3rl_jax.rl.train_step import GRPOStep
from t3rl_jax.rollout import engine_analysis


def build_run(cfg, devices=None):
    """(setup, make_engine): the run's mesh, model bundle, optimizer and shardings, and its rollout backend factory
    (params -> `Qwen3Engine` or `SlotClassBackend`, `rollout.factory.backend_for_run`, as the training loop's)."""
    import functools

    from t3rl_jax.rollout.factory import backend_for_run
    from t3rl_jax.run.setup import build_setup

    setup = build_setup(cfg, devices=devices)
    return setup, functools.partial(backend_for_run, setup)


@dataclasses.dataclass
class AbstractStep:
    """The real train step's jitted pieces with abstract (ShapeDtypeStruct) arguments: nothing allocated."""

    setup: object            # the run setup (mesh, bundle, optimizer, shardings)
    grad_fn: object          # forward + backward of one micro-batch (gradients as outputs)
    grad_args: tuple
    accumulate_fn: object    # the same, added into a donated gradient buffer (micro-batches after the first)
    accumulate_args: tuple
    apply_fn: object
    apply_args: tuple
    logprobs_fn: object      # the old-policy / reference log-prob pass of one micro-batch (no gradient)
    logprobs_args: tuple
    make_engine: object = None


def abstract_train_step(cfg, devices=None) -> AbstractStep:
    """One micro-batch of the config's real shapes (rows x train.max_seq_len, logits at every position)."""
    setup, make_engine = build_run(cfg, devices)
    rows, length = setup.rows_per_micro, cfg.train.max_seq_len
    ints = jax.ShapeDtypeStruct((rows, length), np.int32, sharding=setup.batch_sharding)
    floats = jax.ShapeDtypeStruct((rows, length), np.float32, sharding=setup.batch_sharding)
    mb = {"tokens": ints, "positions": ints, "segment_ids": ints, "targets": ints, "loss_mask": floats,
          "rollout_logprobs": floats, "advantages": floats}
    params = setup.bundle.abstract_params
    step = GRPOStep(setup.bundle.train_model(params), setup.optimizer, setup.step_settings,
                    param_shardings=setup.bundle.param_shardings, opt_shardings=setup.opt_shardings,
                    batch_sharding=setup.batch_sharding)
    slots = length if setup.step_settings.compact_logits else None
    denominator = jax.ShapeDtypeStruct((), np.float32)
    own_anchor = jax.ShapeDtypeStruct((), np.bool_)
    logprobs, first, accumulate = step.functions_for(slots)
    return AbstractStep(setup, first, (params, mb, floats, floats, denominator, own_anchor),
                        accumulate, (params, params, mb, floats, floats, denominator, own_anchor),
                        step._apply, (params, setup.abstract_opt, params),
                        logprobs, (params, mb), make_engine)


@dataclasses.dataclass(frozen=True)
class Compilable:
    """One jitted function with its abstract arguments, static keyword arguments and the arguments among them
    (or outputs, for an allocation) that are resident run state (not built for this call)."""

    name: str
    jitted: object
    args: tuple
    kwargs: dict
    resident: tuple


@dataclasses.dataclass
class RunFunctions:
    """Every jitted function of a training run, and the state that stays resident on the devices throughout."""

    step: AbstractStep
    functions: list[Compilable]
    resident: dict[str, int]  # name -> bytes per device (params, optimizer state, reference params, decode state)
    notes: list[str]


def run_functions(cfg, devices=None) -> RunFunctions:
    """The gradient step (first and accumulating micro-batch), the optimizer update, the old/reference log-prob
    pass, the decode-state allocation, the engine's multi-slot prefill at its largest buckets and the decode loop.
    """
    from t3rl_jax.accel.compile_report import tree_bytes_per_device

    step = abstract_train_step(cfg, devices)
    setup = step.setup
    params, opt = setup.bundle.abstract_params, setup.abstract_opt
    kl_on = setup.step_settings.loss.needs_reference
    fns = [
        Compilable("grad_first", step.grad_fn, step.grad_args, {}, (params,)),
        Compilable("grad_accumulate", step.accumulate_fn, step.accumulate_args, {}, (params,)),
        Compilable("optimizer_update", step.apply_fn, step.apply_args, {}, (params, opt)),
        Compilable("logprob_pass", step.logprobs_fn, step.logprobs_args, {}, (params,)),
    ]
    resident = {"params": tree_bytes_per_device(params), "optimizer_state": tree_bytes_per_device(opt)}
    notes = []
    if kl_on:
        resident["reference_params"] = tree_bytes_per_device(params)
        notes.append("KL on: reference params resident (a copy of params)")
    if setup.step_settings.old_logprobs != "trainer" and not kl_on:
        notes.append("logprob_pass is not run by this config (old log-probs from the rollout, KL off)")
    engine = step.make_engine(params)
    targets = engine_analysis.compile_targets(engine, params,
                                              prefill_tokens_per_call=cfg.rollout.prefill_tokens_per_call)
    # Every slot class's decode state stays resident side by side.
    for name, state in engine_analysis.decode_states(targets).items():
        resident[name] = tree_bytes_per_device(state)
    for name, (jitted, args, kwargs, resident_args) in targets.items():
        fns.append(Compilable(name, jitted, args, kwargs, resident_args))
    return RunFunctions(step, fns, resident, notes)


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
    return DryRunReport(step.setup.bundle.config.num_params, dict(step.setup.mesh.shape), True)
