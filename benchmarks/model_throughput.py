"""Forward+backward tokens/s of our Qwen3 vs transformers' PyTorch Qwen3: same weights, f32, same CPU, one run.

    python benchmarks/model_throughput.py [--repeats 3] [--batch 4] [--seq 512]
    python benchmarks/model_throughput.py --gpu [--seq 8192]   # MFU of the real Qwen3-4B train step (GPU only)

CPU mode: a 4-layer, hidden-256, vocab-4096 Qwen3 (8 query / 4 KV heads of 32) is built in transformers with
random weights, saved, and loaded into ours, so both run the very same parameters. One step is the mean
next-token cross-entropy over a [batch, seq] batch and its gradient w.r.t. every parameter. transformers runs its
default attention (SDPA). Ours uses --attention: `blockwise` (default; t3rl_jax.models.chunked_attention, which
skips fully masked key blocks, so causal masking halves the work, and recomputes scores in the backward) or
`reference` (attention.attend, dense scores). Best of --repeats after a warm-up; the last line is
`ratio=<ours / transformers>`; runs take turns so load from other processes hits both alike.

GPU mode: Qwen3-4B-Instruct-2507's architecture (random weights, bf16 compute, f32 master weights, full remat)
on one [1, seq] packed row; prints tokens/s, achieved TFLOP/s from the analytic FLOP count (t3rl_jax.flops) and
MFU against the device's dense BF16 peak.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BENCH_HF = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=4, head_dim=32, max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_theta=1e6, tie_word_embeddings=True)


def _attention_fns():
    import functools

    from t3rl_jax.models.attention import attend
    from t3rl_jax.models.chunked_attention import flash_attention

    # 128-key blocks measured fastest on CPU at S=512 (64: same, 256: 2x slower, the dense reference: 3x).
    return {"reference": attend, "blockwise": functools.partial(flash_attention, block_size=128)}


ATTENTION = _attention_fns()


def best_times(fns, repeats: int) -> list[float]:
    """Best wall time of each function after a warm-up (compilation), the functions taking turns each round so
    that load from other processes on a shared machine falls on all of them alike."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def hf_model(seed: int = 0, **overrides):
    """A random transformers Qwen3 of the benchmark's shape (`overrides`: other config fields)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen3Config(**{**BENCH_HF, **overrides})
    model = transformers.Qwen3ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model.train()


def hf_step(model, tokens):
    import torch

    ids = torch.as_tensor(tokens, dtype=torch.long)

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()

    return step


def our_step(model):
    """jit(grad of the same loss) over our model's parameters; returns (params, step)."""
    import jax
    import optax
    from flax import nnx

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, tokens, positions, segments):
        logits = nnx.merge(graphdef, params, rest)(tokens, positions, segments)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    return params, jax.jit(jax.value_and_grad(loss))


def ours_step(model, tokens):
    import jax
    import numpy as np

    params, step = our_step(model)
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    segments = np.ones(tokens.shape, np.int32)
    return lambda: jax.block_until_ready(step(params, tokens, positions, segments))


def cpu_benchmark(args) -> float:
    import numpy as np
    import torch

    from t3rl_jax.models import hf_io

    torch.set_num_threads(os.cpu_count() or 1)
    hf = hf_model()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = hf_io.load_hf(tmp, scan_layers=True, attention_fn=ATTENTION[args.attention])
    tokens = np.random.default_rng(0).integers(0, BENCH_HF["vocab_size"], (args.batch, args.seq)).astype(np.int32)
    n = tokens.size
    t_hf, t_ours = best_times([hf_step(hf, tokens), ours_step(ours, tokens)], args.repeats)
    print(f"machine: {os.cpu_count()} CPU cores; batch {args.batch} x {args.seq}, f32, fwd+bwd, best of {args.repeats}, alternating")
    print(f"transformers {hf.config._attn_implementation}: {t_hf * 1e3:8.1f} ms  {n / t_hf:9.0f} tok/s")
    print(f"ours ({args.attention}):{' ' * (15 - len(args.attention))}{t_ours * 1e3:8.1f} ms  {n / t_ours:9.0f} tok/s")
    return t_hf / t_ours


def gpu_benchmark(args) -> float:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from t3rl_jax import flops
    from t3rl_jax.models.chunked_attention import flash_attention
    from t3rl_jax.models.model_config import QWEN3_4B_INSTRUCT_2507
    from t3rl_jax.models.qwen3 import Qwen3

    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if not gpus:
        raise SystemExit(f"--gpu needs a GPU, but JAX sees only {', '.join(sorted({d.platform for d in jax.devices()}))}"
                         " devices; run the CPU comparison without --gpu")
    cfg = QWEN3_4B_INSTRUCT_2507
    model = Qwen3(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.float32, compute_dtype=jnp.bfloat16,
                  remat_policy="full", attention_fn=flash_attention)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, args.seq)).astype(np.int32)
    (seconds,) = best_times([ours_step(model, tokens)], args.repeats)
    per_token = flops.train_flops_per_token(cfg, seq_len=args.seq)
    achieved = per_token * args.seq / seconds
    peak = flops.peak_flops_for_device(gpus[0].device_kind)
    print(f"device: {gpus[0].device_kind}; Qwen3-4B fwd+bwd, [1, {args.seq}] bf16, full remat")
    print(f"{seconds * 1e3:.1f} ms/step  {args.seq / seconds:.0f} tok/s  {achieved / 1e12:.1f} TFLOP/s "
          f"(model FLOPs, remat recompute not counted)")
    return flops.mfu(achieved, peak)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=None, help="sequence length (512 on CPU, 8192 with --gpu)")
    parser.add_argument("--attention", choices=sorted(ATTENTION), default="blockwise")
    parser.add_argument("--gpu", action="store_true", help="MFU of the real Qwen3-4B train step on a GPU")
    args = parser.parse_args(argv)
    if args.gpu:
        args.seq = args.seq or 8192
        print(f"mfu={gpu_benchmark(args):.3f}")
        return 0
    args.seq = args.seq or 512
    print(f"ratio={cpu_benchmark(args):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
