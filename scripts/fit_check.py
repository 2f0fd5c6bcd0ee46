"""Does a training configuration fit in device memory? Compile every jitted function a run executes and ask XLA.

    python scripts/fit_check.py --config=stage1 --target=h200     # 8 H200s, the GPU compiler (no GPU needed)
    python scripts/fit_check.py --config=stage1 --target=v5p      # a v5p 8-chip slice, libtpu's compiler
    python scripts/fit_check.py --config=stage1 --target=v5p "--config.rollout.slot_classes=((96, 16384), (32, 49152))" \
        --config.rollout.max_concurrent_decodes=128
    python scripts/fit_check.py --config=stage2                   # fake CPU devices (no accelerator plugins)

Builds the config's model, mesh, shardings, optimizer and rollout engine exactly as the run does, with abstract
`jax.ShapeDtypeStruct` inputs (nothing is allocated), on compile-only devices of `--target` (`t3rl_jax/accel`;
default devices: the config's mesh, one node / slice when an axis is -1) or on `--devices` fake CPU devices. Then
compiles: the micro-batch gradient (first and accumulating), the optimizer update, the old/reference log-prob
pass, and per slot class (`rollout.slot_classes`, functions named `<function>@<slots>x<cache length>`) the
decode-state allocation, the multi-slot prefill at its largest buckets over the whole cache and the decode loop, and
prints each one's per-device argument / output / alias / temp bytes and what it adds to the
resident state while it runs (`transient` = arguments + outputs - aliases + temps - the resident state it reads).

Colocated peak per device = the resident state (params, optimizer state, reference params when KL is on, the
decode state of every slot class) + the largest transient of any one function. XLA:CPU keeps some remat saves in
f32, which the GPU compiler does not: use an accelerator target for real numbers. Last line:
`peak_per_device_bytes=<int>`. Exit status 1 when the peak passes the target's limit (`--limit_gb`; h200: 120 GB,
leaving ~20 GB of the 141 GB for autotuning, cuDNN workspaces and fragmentation that a deviceless compile cannot
see) or a function does not compile for the target (a TPU refuses a program over its HBM); 2 when the target
cannot be set up (plugin missing or of another jax version, unreadable GPU spec).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The accelerator limit a preset must stay under, per device (bytes). TPUs: libtpu's own per-chip HBM.
DEFAULT_LIMIT_GB = {"h200": 120.0, "h100": 64.0}


def force_host_devices(count: int) -> None:
    """Fake CPU devices (and the CPU platform the compile-only plugins need) must be set before jax is imported."""
    if "jax" in sys.modules:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no chip to guard


def compile_and_measure(jitted, abstract_args, name: str = "function") -> dict:
    """Per-device memory (bytes) of one compiled function and its compile seconds (for benchmarks)."""
    from t3rl_jax.accel.compile_report import compile_function

    r = compile_function(name, jitted, tuple(abstract_args))
    return {"argument_bytes": r.argument_bytes, "output_bytes": r.output_bytes, "alias_bytes": r.alias_bytes,
            "temp_bytes": r.temp_bytes, "code_bytes": r.code_bytes, "total_bytes": r.total_bytes,
            "compile_s": r.compile_s}


def devices_for(cfg_mesh, target_name: str | None, requested: int | None) -> int:
    sizes = [int(cfg_mesh[a]) for a in ("data", "fsdp", "tensor", "sequence")]
    if requested:
        return requested
    if -1 not in sizes:
        return math.prod(sizes)
    if target_name:
        from t3rl_jax.accel import targets
        return targets.target(target_name).devices_per_slice
    return 8


def measure(cfg, devices=None, *, only: set[str] | None = None, hlo_dir: str | None = None, log=print) -> dict:
    """Compile the run's functions -> {"run": RunFunctions, "reports": [...], "failures": [...], "peak": int}."""
    from t3rl_jax.accel.compile_report import CompileError, compile_function
    from t3rl_jax.step_analysis import run_functions

    run = run_functions(cfg, devices)
    reports, failures = [], []
    for fn in run.functions:
        if only and fn.name not in only and not any(fn.name.startswith(o) for o in only):
            continue
        try:
            r = compile_function(fn.name, fn.jitted, fn.args, fn.kwargs, resident=fn.resident,
                                 keep_hlo=bool(hlo_dir))
        except CompileError as e:
            failures.append(str(e))
            log(f"FAILED {e}")
            continue
        if hlo_dir:
            os.makedirs(hlo_dir, exist_ok=True)
            with open(os.path.join(hlo_dir, f"{fn.name}.hlo.txt"), "w") as f:
                f.write(r.hlo_text)
        reports.append(r)
        log(_row(r), flush=True)
    largest = max(reports, key=lambda r: r.transient_bytes, default=None)
    peak = sum(run.resident.values()) + (largest.transient_bytes if largest else 0)
    return {"run": run, "reports": reports, "failures": failures, "largest": largest, "peak": peak}


def _gib(n: int) -> str:
    return f"{n / 2**30:9.2f}"


NAME_WIDTH = 26  # "extend_16x512@112x16384": a function of one slot class

HEADER = (f"{'function':>{NAME_WIDTH}} {'args GiB':>9} {'out GiB':>9} {'alias GiB':>9} {'temp GiB':>9} "
          f"{'transient':>9} "
          f"{'compile s':>9}")


def _row(r) -> str:
    return (f"{r.name:>{NAME_WIDTH}} {_gib(r.argument_bytes)} {_gib(r.output_bytes)} {_gib(r.alias_bytes)} "
            f"{_gib(r.temp_bytes)} {_gib(r.transient_bytes)} {r.compile_s:9.1f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="cpu", help="cpu (fake host devices) or an accelerator: "
                        "h200, h100, v5p, v5e, v6e (t3rl_jax/accel/targets.py)")
    parser.add_argument("--devices", type=int, default=None, help="device count (default: the config's mesh; "
                        "one node / slice when an axis is -1)")
    parser.add_argument("--gpu_spec", default=None, help="GpuTargetConfigProto text file (default: the target's)")
    parser.add_argument("--limit_gb", type=float, default=None, help="peak per device allowed, in GB (1e9 bytes); "
                        "default: h200 120, h100 64, TPUs their HBM per chip, cpu none")
    parser.add_argument("--only", default="", help="comma-separated function names (prefixes) to compile")
    parser.add_argument("--hlo_dir", default=None, help="write each function's optimized HLO here")
    args, config_args = parser.parse_known_args(argv)
    accel = args.target != "cpu"
    force_host_devices(args.devices or 8)
    from t3rl_jax.config import config_from_argv
    from t3rl_jax.rollout.factory import slot_classes_of

    cfg, rest = config_from_argv(config_args)
    if rest:
        parser.error(f"unknown arguments: {' '.join(rest)}")
    devices, limit = None, None
    if accel:
        from t3rl_jax.accel import targets

        try:
            target = targets.target(args.target)
            count = devices_for(cfg.mesh, args.target, args.devices)
            devices = targets.compile_only_devices(args.target, count, gpu_spec=args.gpu_spec)
        except targets.TargetError as e:
            print(f"fit_check: {e}", file=sys.stderr)
            return 2
        limit = (int(args.limit_gb * 1e9) if args.limit_gb is not None
                 else int(DEFAULT_LIMIT_GB[target.name] * 1e9) if target.name in DEFAULT_LIMIT_GB
                 else target.hbm_bytes)
    elif args.limit_gb is not None:
        limit = int(args.limit_gb * 1e9)
    only = {s for s in args.only.split(",") if s} or None

    print(HEADER, flush=True)
    m = measure(cfg, devices, only=only, hlo_dir=args.hlo_dir)
    run = m["run"]
    setup = run.step.setup
    model_cfg = setup.bundle.config
    kind = devices[0].device_kind if devices else "cpu"
    print(f"config: {cfg.stage}  target: {args.target} ({kind}) x {setup.mesh.size}  mesh: {dict(setup.mesh.shape)}"
          f"  model: {model_cfg.num_layers} layers, {model_cfg.num_params:,} params  micro-batch: "
          f"{setup.rows_per_micro} x {cfg.train.max_seq_len} tokens  decode slots: "
          + " + ".join(f"{s} x {n:,}" for s, n in slot_classes_of(cfg.rollout)) + " tokens")
    for note in run.notes:
        print(f"note: {note}")
    for name, n in run.resident.items():
        print(f"{'resident ' + name:>{NAME_WIDTH + 10}}: {_gib(n)} GiB  ({n:,})")
    resident = sum(run.resident.values())
    largest = m["largest"]
    print(f"{'resident total':>{NAME_WIDTH + 10}}: {_gib(resident)} GiB")
    if largest is not None:
        print(f"{'largest transient':>{NAME_WIDTH + 10}}: {_gib(largest.transient_bytes)} GiB  ({largest.name})")
    peak = m["peak"]
    print(f"{'colocated peak per device':>{NAME_WIDTH + 10}}: {_gib(peak)} GiB  ({peak / 1e9:.1f} GB)"
          + (f"  limit {limit / 2**30:.2f} GiB ({limit / 1e9:.1f} GB)" if limit else ""))
    status = 0
    for failure in m["failures"]:
        print(f"fit_check: {failure}", file=sys.stderr)
        status = 1
    if limit is not None and peak > limit:
        during = f" + {largest.name} transient {largest.transient_bytes:,}" if largest else ""
        print(f"fit_check: {cfg.stage} does not fit {args.target}: peak {peak:,} bytes per device > limit "
              f"{limit:,} (resident {resident:,}{during})", file=sys.stderr)
        status = 1
    print(f"peak_per_device_bytes={peak}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
