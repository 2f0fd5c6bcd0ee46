"""Load a model and its architecture from whatever a user points a script at.

    model, config = load_model(checkpoint="runs/stage1")                 # a run's workdir: its latest step
    model, config = load_model(checkpoint="runs/stage1/checkpoints/40")  # one step of a run
    model, config = load_model(checkpoint="ckpts/qwen3-4b")              # a params checkpoint (import_hf.py)
    model, config = load_model(hf_dir="Qwen3-4B-Instruct-2507")          # a Hugging Face directory

A trainer checkpoint stores only arrays, so its architecture comes from, in order: an explicit `run_config` (the
run's preset, as `--config=NAME` gives it), a `model_config.json` (params checkpoints carry one) or the run's HF
export (`hf_export/config.json`) in the checkpoint directory or up to two levels above it. Stored shapes are
checked against that architecture before anything is read, so a wrong one stops with the offending tensor.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx

from t3rl_jax import params_checkpoint
from t3rl_jax.checkpointing import restore_params_only
from t3rl_jax.config import EXPORT_SUBDIR
from t3rl_jax.models import hf_io
from t3rl_jax.models.model_config import Qwen3Config
from t3rl_jax.models.qwen3 import Qwen3

RUN_CHECKPOINTS_SUBDIR = "checkpoints"  # the trainer writes WORKDIR/checkpoints/<step>/params


def _candidate_dirs(checkpoint: str) -> list[str]:
    """The checkpoint directory and up to two parents (step dir -> checkpoints/ -> workdir)."""
    dirs, d = [], os.path.abspath(checkpoint)
    for _ in range(3):
        dirs.append(d)
        d = os.path.dirname(d)
    return dirs


def checkpoint_architecture(checkpoint: str, run_config=None) -> Qwen3Config:
    """The Qwen3Config a checkpoint was written for (see the module docstring for where it is looked up)."""
    if run_config is not None:
        from t3rl_jax.model_factory import model_config

        return model_config(run_config)
    for d in _candidate_dirs(checkpoint):
        if os.path.isfile(os.path.join(d, params_checkpoint.CONFIG_FILE)):
            return params_checkpoint.load_config(d)
        export = os.path.join(d, EXPORT_SUBDIR)
        if os.path.isfile(os.path.join(export, "config.json")):
            return Qwen3Config.from_hf_dir(export)
    raise FileNotFoundError(
        f"cannot tell the architecture of checkpoint {checkpoint}: no {params_checkpoint.CONFIG_FILE} or "
        f"{EXPORT_SUBDIR}/config.json in it or its two parent directories; pass the run's preset "
        f"(--config=NAME [--config.model.KEY=VALUE ...])")


def _checkpoint_source(checkpoint: str) -> str:
    """A run's workdir stands for its checkpoints/ directory (the latest step is restored)."""
    runs = os.path.join(checkpoint, RUN_CHECKPOINTS_SUBDIR)
    if not os.path.isdir(os.path.join(checkpoint, params_checkpoint.PARAMS_DIR)) and os.path.isdir(runs):
        return runs
    return checkpoint


def load_model(*, checkpoint: str | None = None, hf_dir: str | None = None, run_config=None,
               step: int | None = None, param_dtype="float32", compute_dtype="float32") -> tuple[Qwen3, Qwen3Config]:
    """(Qwen3 with loaded weights, its config) from exactly one of `checkpoint` or `hf_dir`.

    `step` picks a step of a run's checkpoints (default: the latest). `run_config` is a run config (ConfigDict)
    whose model section describes the checkpoint's architecture.
    """
    if (checkpoint is None) == (hf_dir is None):
        raise ValueError("give exactly one of checkpoint (a trainer or params checkpoint) or hf_dir")
    kwargs = dict(param_dtype=jnp.dtype(param_dtype), compute_dtype=jnp.dtype(compute_dtype))
    if hf_dir is not None:
        if step is not None:
            raise ValueError(f"step={step} applies to trainer checkpoints, not to the HF directory {hf_dir}")
        if not os.path.isfile(os.path.join(hf_dir, "config.json")):
            raise FileNotFoundError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
        config = Qwen3Config.from_hf_dir(hf_dir)
        return hf_io.load_hf(hf_dir, config=config, **kwargs), config
    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    config = checkpoint_architecture(checkpoint, run_config)
    graphdef, state = nnx.split(hf_io.abstract_model(config, **kwargs))
    restored = restore_params_only(_checkpoint_source(checkpoint), nnx.to_pure_dict(state), step=step)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state), config


def split_config_args(argv: list[str]):
    """(run config or None, remaining argv): `--config=NAME [--config.KEY=VALUE]` names the architecture of a
    trainer checkpoint that does not describe itself."""
    from t3rl_jax.config import config_from_argv

    if any(a == "--config" or a.startswith(("--config=", "--config.")) for a in argv):
        return config_from_argv(argv)
    return None, argv


def add_model_source_args(parser, *, required: bool = True) -> None:
    """The model-source flags shared by the command-line tools (eval, serve); `required=False` where the tool can
    run without a model (eval's ground-truth replay)."""
    src = parser.add_mutually_exclusive_group(required=required)
    src.add_argument("--checkpoint", help="trainer workdir / checkpoints dir / step dir, or a params checkpoint")
    src.add_argument("--hf_dir", help="Hugging Face model directory")
    parser.add_argument("--step", type=int, help="step of a trainer checkpoint (default: latest)")
    parser.add_argument("--param_dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute and KV-cache dtype (bfloat16 on GPU)")


def load_model_from_args(args, run_config=None):
    """`load_model` from flags added by `add_model_source_args`."""
    return load_model(checkpoint=args.checkpoint, hf_dir=args.hf_dir, run_config=run_config, step=args.step,
                      param_dtype=args.param_dtype, compute_dtype=args.dtype)
