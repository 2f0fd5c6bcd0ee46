"""Rollout memory per device on an accelerator target, compiled without the accelerator: the engine's decode-state
allocation, its largest multi-slot extends and its decode loop at a config's real shapes and mesh.

    python benchmarks/rollout_memory.py --config=stage2 --target=h200

Builds the config's model abstractly (nothing allocated) on the target's compile-only devices with the config's
mesh, takes `Qwen3Engine.compile_targets` and compiles each for the target. Prints per function the per-device
argument / output / alias / temp bytes and total = argument + output - alias + temp; the last line is
`ratio=<decode-state bytes per device / the target's memory per device>`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from t3rl_jax.accel import targets  # noqa: E402

targets.prepare_environment()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="h200", choices=sorted(targets.TARGETS))
    parser.add_argument("--only", default="", help="comma-separated compile targets (default: all)")
    args, config_args = parser.parse_known_args(argv)
    import jax.numpy as jnp

    from t3rl_jax import model_factory
    from t3rl_jax import sharding as sh
    from t3rl_jax.config import config_from_argv
    from t3rl_jax.rollout.engine import Qwen3Engine, SamplingSettings
    from t3rl_jax.tokenizer import QWEN3_VOCAB_SIZE

    cfg, rest = config_from_argv(config_args)
    if rest:
        parser.error(f"unknown arguments: {' '.join(rest)}")
    t = targets.target(args.target)
    sizes = sh.mesh_shape(cfg.mesh, t.devices_per_slice)
    mesh = targets.mesh_for(args.target, dict(zip(sh.MESH_AXES, sizes)))
    rules = sh.logical_axis_rules(fsdp_over_sequence=True)  # the trainer's rules
    bundle = model_factory.build(cfg, mesh, rules)
    r = cfg.rollout
    engine = Qwen3Engine(bundle.rollout_model(bundle.abstract_params), max_concurrent_decodes=r.max_concurrent_decodes,
                         max_prefill_length=r.max_prefill_length, max_cache_length=r.max_context_tokens,
                         sampling=SamplingSettings(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k),
                         cache_dtype=jnp.dtype(cfg.model.dtype), mesh=mesh,
                         valid_vocab_size=min(QWEN3_VOCAB_SIZE, bundle.config.vocab_size))
    wanted = [n for n in args.only.split(",") if n]
    gib = 2 ** 30
    print(f"config {cfg.stage}  target {args.target}  mesh {dict(mesh.shape)}  slots {r.max_concurrent_decodes} x "
          f"{r.max_context_tokens} tokens  prefill budget {r.prefill_tokens_per_call}")
    state_bytes = None
    for name, (jitted, abstract, static) in engine.compile_targets(
            bundle.abstract_params, prefill_tokens_per_call=r.prefill_tokens_per_call).items():
        if wanted and name not in wanted:
            continue
        start = time.perf_counter()
        mem = jitted.trace(*abstract, **static).lower().compile().memory_analysis()
        total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                 + mem.temp_size_in_bytes)
        if name == "decode_state":
            state_bytes = mem.output_size_in_bytes
        print(f"{name:>15}: args {mem.argument_size_in_bytes / gib:7.2f}  out {mem.output_size_in_bytes / gib:7.2f}  "
              f"alias {mem.alias_size_in_bytes / gib:7.2f}  temp {mem.temp_size_in_bytes / gib:7.2f}  "
              f"total {total / gib:7.2f} GiB per device  ({time.perf_counter() - start:.0f} s to compile)",
              flush=True)
    if state_bytes is not None:
        print(f"ratio={state_bytes / t.hbm_bytes:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
