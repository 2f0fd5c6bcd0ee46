"""Compiled per-device memory of a training update vs context parallelism, for 8 H200s (compile-only devices,
`t3rl_jax/accel`) when the CUDA plugin is installed, else on 8 fake CPU devices (XLA:CPU keeps remat saves in f32,
which the GPU compiler does not: its figures are larger).

    python benchmarks/cp_memory.py                      # full Qwen3-4B, 8k and 32k, CP 1/2/4/8
    python benchmarks/cp_memory.py --target=cpu         # the fake CPU devices even when the plugin is there
    python benchmarks/cp_memory.py --strategies all_gather,ring --seq_lens 32768 --cps 4,8
    python benchmarks/cp_memory.py --time_attention     # also time both CP attentions (executed)

For CP = c the mesh is (data 1, fsdp 8/c, tensor 1, sequence c) and the micro-batch 8/c
sequences, so every device holds one sequence's T/c tokens and the same weight shards (weights
are sharded over fsdp x sequence). Nothing is allocated: forward + backward of the GRPO policy
loss is the trainer's own gradient step (stage 2's config with the mesh, sequence length and micro-batch
overridden; `scripts/fit_check.py` compiles it on abstract inputs) and XLA's memory analysis is read.
Last line: `ratio=<temp bytes at CP4 / CP1 for the longest sequence>`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 8


def _ints(text):
    return tuple(int(x) for x in text.split(","))


def time_cp_attention(strategies, seq_len=4096, heads=(8, 2), head_dim=128, block=512, repeats=3):
    """Wall time of one fwd+bwd of CP attention alone (CP 8 and 4), executed on the fake devices."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from t3rl_jax import sharding as sh
    from t3rl_jax.models import context_parallel as cp

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, seq_len, heads[0], head_dim)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, seq_len, heads[1], head_dim)), jnp.float32)
    pos = cp.to_load_balanced(np.arange(seq_len, dtype=np.int32)[None], 8)
    seg = np.ones((1, seq_len), np.int32)
    rows = []
    for cp_size in (8, 4):
        mesh = sh.make_mesh({"data": 1, "fsdp": 1, "tensor": DEVICES // cp_size, "sequence": cp_size})
        for strategy in strategies:
            fn = cp.make_context_parallel_attention(mesh, strategy=strategy, block_size=block)
            loss = lambda q, k, v: jnp.sum(fn(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg,
                                              kv_segment_ids=seg) ** 2)
            step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
            jax.block_until_ready(step(q, k, k))
            start = time.perf_counter()
            for _ in range(repeats):
                jax.block_until_ready(step(q, k, k))
            rows.append((strategy, cp_size, (time.perf_counter() - start) / repeats))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq_lens", type=_ints, default=(8192, 32768))
    parser.add_argument("--cps", type=_ints, default=(1, 2, 4, 8))
    parser.add_argument("--strategies", default="all_gather")
    parser.add_argument("--num_layers", type=int, default=None, help="default: the preset's 36")
    parser.add_argument("--remat", default="full")
    parser.add_argument("--compute_dtype", default="bfloat16")
    parser.add_argument("--time_attention", action="store_true")
    parser.add_argument("--target", default="auto", help="auto (h200 when its plugin is installed), h200 or cpu")
    args = parser.parse_args(argv)
    strategies = tuple(args.strategies.split(","))

    sys.path.insert(0, _ROOT)
    sys.path.insert(0, os.path.join(_ROOT, "scripts"))
    import fit_check

    fit_check.force_host_devices(DEVICES)
    import jax

    if len(jax.devices()) < DEVICES:
        raise SystemExit(f"needs {DEVICES} devices, found {len(jax.devices())} (set XLA_FLAGS before importing jax)")

    from t3rl_jax.accel import targets
    from t3rl_jax.config import load_config
    from t3rl_jax.step_analysis import abstract_train_step

    devices = None
    if args.target != "cpu":
        try:
            devices = targets.compile_only_devices("h200", DEVICES)
        except targets.TargetError as e:
            if args.target == "h200":
                raise SystemExit(f"--target=h200: {e}")
            print(f"compiling on fake CPU devices ({e})")
    print(f"target: {devices[0].device_kind if devices else 'cpu'} x {DEVICES}")

    temp = {}
    header = f"{'strategy':>10} {'seq_len':>8} {'cp':>3} {'mesh':>9} {'temp GiB':>9} {'args GiB':>9} " \
             f"{'total GiB':>9} {'compile s':>9}"
    print(header)
    memory_strategy = "all_gather"  # the trainer's (ring measured the same memory; --time_attention compares speed)
    for seq_len in args.seq_lens:
        for cp_size in args.cps:
            mesh = (1, DEVICES // cp_size, 1, cp_size)
            overrides = {"mesh.data": 1, "mesh.fsdp": DEVICES // cp_size, "mesh.tensor": 1,
                         "mesh.sequence": cp_size, "train.max_seq_len": seq_len,
                         "train.micro_batch_size": DEVICES // cp_size, "rollout.max_context_tokens": seq_len,
                         "rollout.max_response_tokens": seq_len // 2,
                         "rollout.max_prefill_length": min(8192, seq_len), "model.remat": args.remat,
                         "model.dtype": args.compute_dtype}
            if args.num_layers:
                overrides["model.num_layers"] = args.num_layers
            step = abstract_train_step(load_config("stage2", overrides), devices)
            m = fit_check.compile_and_measure(step.grad_fn, step.grad_args)  # fwd+bwd, gradients as outputs
            temp[seq_len, cp_size] = m["temp_bytes"]
            print(f"{memory_strategy:>10} {seq_len:>8} {cp_size:>3} {','.join(map(str, mesh)):>9} "
                  f"{m['temp_bytes'] / 2**30:9.2f} {m['argument_bytes'] / 2**30:9.2f} "
                  f"{m['total_bytes'] / 2**30:9.2f} {m['compile_s']:9.1f}", flush=True)
    if args.time_attention:
        print(f"{'strategy':>10} {'cp':>3} {'fwd+bwd s':>9}   (attention only, T=4096, 8/2 heads, d=128, executed)")
        for strategy, cp_size, seconds in time_cp_attention(strategies):
            print(f"{strategy:>10} {cp_size:>3} {seconds:9.3f}")
    longest = max(args.seq_lens)
    if (longest, 4) in temp and (longest, 1) in temp:
        print(f"ratio={temp[longest, 4] / temp[longest, 1]:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
