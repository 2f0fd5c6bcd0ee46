"""Does a training configuration fit in device memory? Compile its real GRPO train step and ask XLA.

    python scripts/fit_check.py --config=stage2
    python scripts/fit_check.py --config=stage2 --config.train.max_seq_len=32768 --config.mesh.fsdp=1 \\
        --config.mesh.sequence=8

Builds the config's model, mesh (on fake CPU devices: `--devices`, default 8), shardings and optimizer exactly as
the trainer does, with abstract `jax.ShapeDtypeStruct` inputs (nothing is allocated), then compiles the trainer's
jitted pieces: the micro-batch gradient (forward + backward of the GRPO loss, logits at every position), its
variant that adds into the gradient buffer of earlier micro-batches, and the optimizer update. Prints XLA's per-device `memory_analysis()` and `cost_analysis()` FLOPs (XLA counts a loop body
once, so with the layer scan that figure is about one layer's; the analytic model FLOPs are printed beside it).
The last line is `per_device_bytes=<int>`: the peak of (gradient step + the resident optimizer state) and the
optimizer update, each = arguments + outputs - donated aliases + temporaries + code.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def force_host_devices(count: int) -> None:
    """Fake CPU devices must be requested before jax is imported."""
    if "jax" in sys.modules:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def compile_and_measure(jitted, abstract_args) -> dict:
    """Per-device memory (bytes) and FLOPs of one compiled function, plus compile seconds."""
    start = time.perf_counter()
    compiled = jitted.lower(*abstract_args).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out = {
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "code_bytes": int(mem.generated_code_size_in_bytes),
        "flops": float(cost.get("flops", float("nan"))) if cost else float("nan"),
        "compile_s": seconds,
    }
    out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
                          + out["code_bytes"])
    return out


def tree_bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) else leaf.shape
        total += int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
    return total


def analytic_flops(model_cfg, rows: int, seq_len: int) -> float:
    """Model FLOPs of forward + backward of one micro-batch: 6 * params * tokens + causal attention."""
    dense = 6 * model_cfg.num_params * rows * seq_len
    attn = 12 * model_cfg.num_layers * model_cfg.num_heads * model_cfg.head_dim * (seq_len ** 2 / 2) * rows
    return float(dense + attn)


def measure(cfg) -> dict:
    """Compile the config's train step; memory per device of each piece and the peak."""
    from t3rl_jax.step_analysis import abstract_train_step

    step = abstract_train_step(cfg)
    grad = compile_and_measure(step.grad_fn, step.grad_args)
    accumulate = compile_and_measure(step.accumulate_fn, step.accumulate_args)
    apply = compile_and_measure(step.apply_fn, step.apply_args)
    opt_bytes = tree_bytes_per_device(step.trainer.abstract_opt)
    # Later micro-batches hold the gradient buffer too, so the accumulating variant is the larger one.
    peak = max(grad["total_bytes"] + opt_bytes, accumulate["total_bytes"] + opt_bytes, apply["total_bytes"])
    return {"step": step, "grad": grad, "accumulate": accumulate, "apply": apply, "opt_bytes": opt_bytes,
            "per_device_bytes": peak}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices (a -1 mesh axis fills them)")
    args, config_args = parser.parse_known_args(argv)
    force_host_devices(args.devices)
    from t3rl_jax.config import config_from_argv

    cfg, rest = config_from_argv(config_args)
    if rest:
        parser.error(f"unknown arguments: {' '.join(rest)}")
    m = measure(cfg)
    trainer = m["step"].trainer
    model_cfg = trainer.bundle.config
    rows, seq = trainer.rows_per_micro, cfg.train.max_seq_len
    print(f"config: {cfg.stage}  mesh: {dict(trainer.mesh.shape)}  model: {model_cfg.num_layers} layers, "
          f"{model_cfg.num_params:,} params  micro-batch: {rows} x {seq} tokens")
    gib = lambda n: f"{n / 2**30:8.2f} GiB"  # noqa: E731
    for name in ("grad", "accumulate", "apply"):
        for key in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "code_bytes", "total_bytes"):
            print(f"{name + ' ' + key:>22}: {gib(m[name][key])}  ({m[name][key]:,})")
    print(f"{'optimizer state':>22}: {gib(m['opt_bytes'])}")
    model_flops = analytic_flops(model_cfg, rows, seq)
    devices = trainer.mesh.size
    print(f"{'xla_flops':>22}: {m['grad']['flops']:.4g} per device (XLA cost analysis; loop bodies counted once)")
    print(f"{'model_flops':>22}: {model_flops:.4g} per micro-batch (6*N*tokens + attention), "
          f"{model_flops / devices:.4g} per device")
    print(f"{'compile':>22}: {sum(m[k]['compile_s'] for k in ('grad', 'accumulate', 'apply')):.1f} s")
    print(f"per_device_bytes={m['per_device_bytes']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
