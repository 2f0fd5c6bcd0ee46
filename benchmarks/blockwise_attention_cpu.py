"""Seconds of the blockwise attention kernel (forward, forward+backward) on this CPU, against references timed in
the same run.

    JAX_PLATFORMS=cpu python benchmarks/blockwise_attention_cpu.py [--against REV] [--blocks 256,512]

Shapes: the CPU demo's rows (2 rows of 4,608 tokens, 4 query / 2 KV heads of 16, float32: what `make demo` and the
end-to-end tests train) and Qwen3-4B's heads (1 row of 2,048 tokens, 32 / 8 heads of 128). References: the dense
einsum `attention.attend` (builds the [B, H, T, S] scores), and with `--against REV` the kernel file of that git
revision (e.g. the commit before the loop-layout change), loaded beside the current one. Each line prints seconds
and `ratio=<reference / current>` (above 1: the current kernel is faster).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

SHAPES = {"demo": (2, 4608, 4, 2, 16), "qwen3-4b heads": (1, 2048, 32, 8, 128)}


def kernel_at(rev: str):
    """The chunked-attention module as of git revision `rev`."""
    source = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:t3rl_jax/models/chunked_attention.py"],
                            check=True, capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "chunked_attention_at_rev.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("chunked_attention_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seconds(fn, *args, repeats: int = 3) -> float:
    import jax

    jax.block_until_ready(fn(*args))  # compile and warm up
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / repeats


def timed(attention, q, k, v, pos, seg):
    import jax

    fn = lambda q, k, v: attention(q, k, v, q_positions=pos, kv_positions=pos,  # noqa: E731
                                   q_segment_ids=seg, kv_segment_ids=seg)
    grad = jax.grad(lambda q, k, v: fn(q, k, v).sum(), argnums=(0, 1, 2))
    return seconds(jax.jit(fn), q, k, v), seconds(jax.jit(grad), q, k, v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="", help="git revision whose kernel is timed as a second reference")
    parser.add_argument("--blocks", default="512", help="comma-separated block sizes")
    args = parser.parse_args()

    import functools

    import jax.numpy as jnp
    import numpy as np

    from t3rl_jax.models import chunked_attention
    from t3rl_jax.models.attention import attend

    old = kernel_at(args.against) if args.against else None
    rng = np.random.default_rng(0)
    for name, (b, t, hq, hkv, d) in SHAPES.items():
        q = jnp.asarray(rng.standard_normal((b, t, hq, d)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((b, t, hkv, d)), jnp.float32)
        v = jnp.asarray(rng.standard_normal((b, t, hkv, d)), jnp.float32)
        pos = jnp.tile(jnp.arange(t, dtype=jnp.int32), (b, 1))
        seg = jnp.ones((b, t), jnp.int32)
        dense = timed(attend, q, k, v, pos, seg)
        print(f"{name}: [{b}, {t}] x {hq}/{hkv} heads of {d}; dense attend fwd {dense[0]:.3f} s, fwd+bwd "
              f"{dense[1]:.3f} s", flush=True)
        for block in (int(x) for x in args.blocks.split(",")):
            new = timed(functools.partial(chunked_attention.flash_attention, block_size=block), q, k, v, pos, seg)
            line = (f"  block {block}: fwd {new[0]:.3f} s (ratio={dense[0] / new[0]:.2f} vs dense), fwd+bwd "
                    f"{new[1]:.3f} s (ratio={dense[1] / new[1]:.2f} vs dense)")
            if old is not None:
                ref = timed(functools.partial(old.flash_attention, block_size=block), q, k, v, pos, seg)
                line += (f"; {args.against}: fwd {ref[0]:.3f} s (ratio={ref[0] / new[0]:.2f}), fwd+bwd {ref[1]:.3f}"
                         f" s (ratio={ref[1] / new[1]:.2f})")
            print(line, flush=True)


if __name__ == "__main__":
    main()
