"""Seconds of the CPU demo's supervised warm-start step at several training-attention tile sizes, alternated in one
run so a drifting machine hits every size alike.

    JAX_PLATFORMS=cpu python benchmarks/sft_step_cpu.py [--blocks 512,256] [--rounds 2] [--steps 5]

The step is `rl/sft.make_sft_step` of `configs/demo.py` (2-layer, 64-wide Qwen3, the real 151,936-token vocabulary)
on one micro-batch of 2 random 4,608-token rows with 240 loss tokens each, on one CPU device as `make demo` runs.
Each round builds the model once per block size (`model_factory.CPU_TRAIN_ATTENTION_BLOCK`), compiles, takes two
warm-up steps, then times `--steps` steps; the summary prints each size's median step and `ratio=<first size /
this size>` (above 1: faster than the first size).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROWS, LENGTH, LOSS_TOKENS = 2, 4608, 240


def step_seconds(block: int, steps: int) -> list[float]:
    import jax
    import numpy as np
    import optax

    from configs import demo
    from t3rl_jax import model_factory
    from t3rl_jax import sharding as sh
    from t3rl_jax.rl import sft
    from t3rl_jax.rl.train_step import loss_slots
    from t3rl_jax.run.setup import build_setup

    model_factory.CPU_TRAIN_ATTENTION_BLOCK = block
    cfg = demo.get_config()
    setup = build_setup(cfg)
    params = jax.tree.map(lambda x: x.copy(), model_factory.init_params(cfg, setup.bundle))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 151_000, (ROWS, LENGTH)).astype(np.int32)
    mask = np.zeros((ROWS, LENGTH), np.float32)
    mask[:, LENGTH - 600:LENGTH - 600 + LOSS_TOKENS] = 1.0
    batch = {"tokens": tokens, "positions": np.tile(np.arange(LENGTH, dtype=np.int32), (ROWS, 1)),
             "segment_ids": np.ones((ROWS, LENGTH), np.int32), "targets": np.roll(tokens, -1, axis=1),
             "loss_mask": mask}
    batch = {k: jax.device_put(v, setup.batch_sharding) for k, v in batch.items()}
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.0))
    abstract = setup.bundle.abstract_params
    opt_shardings = sh.optax_state_shardings(jax.eval_shape(optimizer.init, abstract), abstract,
                                             setup.param_shardings, setup.mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    step = sft.make_sft_step(setup.bundle, optimizer, param_shardings=setup.param_shardings,
                             batch_sharding=setup.batch_sharding, num_slots=loss_slots(mask, LENGTH), cp=1,
                             opt_shardings=opt_shardings)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        params, opt_state, loss, _ = step(params, opt_state, batch)
        float(loss)
        if i >= 2:  # the first compiles; the second shows whether it compiled again
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", default="512,256", help="comma-separated tile sizes; the first is the reference")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    blocks = [int(b) for b in args.blocks.split(",")]
    seen: dict[int, list[float]] = {b: [] for b in blocks}
    for r in range(args.rounds):
        for b in blocks:
            times = step_seconds(b, args.steps)
            seen[b] += times
            print(f"round {r + 1} block {b}: " + " ".join(f"{t:.2f}" for t in times) + " s", flush=True)
    reference = statistics.median(seen[blocks[0]])
    for b in blocks:
        median = statistics.median(seen[b])
        print(f"block {b}: median step {median:.3f} s (ratio={reference / median:.2f} vs block {blocks[0]})")


if __name__ == "__main__":
    main()
