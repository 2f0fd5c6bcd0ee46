"""One prepared validation of the GPU path on a single H200 (or H100), in one command, offline:

    python scripts/gpu_check.py                 # on the GPU machine: runs every check, ~5 minutes
    python scripts/gpu_check.py --dry_run       # on any CPU machine: compiles every check for an H200 target
    python scripts/gpu_check.py --only parity,attention --out results.json

Checks (each reports into one JSON object, then a short table):
  parity     logits of a small random Qwen3 equal transformers' (PyTorch f32 on the CPU): f32 within 1e-4 of the
             logit scale, bf16 compute within 3e-2 of it
  attention  the fused attention backend (model.attention=auto on this platform) equals the f32 reference in
             values and gradients at 8k tokens, with packed segments + padding, and in context parallelism's
             load-balanced token order
  train      one GRPO train step (micro-batch gradient + optimizer update) at Qwen3-4B shapes, random weights,
             bf16 compute, full remat, 8k tokens, one device: seconds, tokens/s, MFU against the bf16 matmul peak
             measured in the same run
  decode     the engine's decode loop at Qwen3-4B shapes, 64 slots at 4k context: tokens/s and the fraction of the
             HBM roofline (weights + KV bytes read per step / 4.8 TB/s)
  tiny       the tiny preset end to end for two steps (python -m t3rl_jax.main --config=tiny)

With --dry_run nothing runs on an accelerator: every jitted function above is compiled for an H200 through the
CUDA plugin (t3rl_jax/accel/targets.py) and its per-device memory and custom calls are reported; the tiny preset
runs its own dry run. The last line is `gpu_check=passed` or `gpu_check=failed`; the exit code is 0 only if every
check passed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CHECKS = ("parity", "attention", "train", "decode", "tiny")
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12}
F32_TOLERANCE = 1e-4   # max |diff| / max |reference logit|
BF16_TOLERANCE = 3e-2  # bf16 has 8 mantissa bits; two layers of bf16 matmuls and norms stay well inside this
ATTENTION_TOLERANCE = 2e-2  # bf16 kernel vs f32 reference, relative to the output's max


@dataclasses.dataclass
class Context:
    dry_run: bool
    mesh: object           # one-device mesh over the GPU (or the H200 compile target)
    device_kind: str


def _sds_tree(tree, sharding):
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def compile_report(jitted, *args, **kwargs) -> dict:
    """Compile for the context's devices; per-device bytes and the custom calls the optimized HLO holds."""
    import collections
    import re

    t0 = time.perf_counter()
    compiled = jitted.trace(*args, **kwargs).lower().compile()
    mem = compiled.memory_analysis()
    text = compiled.as_text()
    calls = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', text))
    return {"compile_s": round(time.perf_counter() - t0, 2),
            "argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
            "temp_bytes": int(mem.temp_size_in_bytes), "alias_bytes": int(mem.alias_size_in_bytes),
            "custom_calls": dict(calls)}


def _block(tree):
    import jax

    return jax.block_until_ready(tree)


def timed(fn, *, repeats: int, block) -> float:
    """Median seconds of `fn()` after one warm-up call (compilation excluded)."""
    import numpy as np

    block(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


# ---------------------------------------------------------------------------------------------------- checks
def check_parity(ctx: Context) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    sys.path.insert(0, os.path.join(REPO, "tests"))
    from helpers_hf import make_hf_model, padded_batch, save_hf_dir

    from t3rl_jax.models import hf_io

    reference = make_hf_model(seed=0)
    rng = np.random.default_rng(0)
    tokens, mask, positions, segments = padded_batch(rng, reference.config.vocab_size, [96, 64, 128, 33], 128,
                                                     [False, True, False, True])
    with torch.no_grad():
        want = reference(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                         attention_mask=torch.as_tensor(mask, dtype=torch.long),
                         position_ids=torch.as_tensor(positions, dtype=torch.long)).logits.float().numpy()
    scale = float(np.abs(want[mask > 0]).max())
    out = {"reference": "transformers Qwen3ForCausalLM, PyTorch f32 on the CPU", "logit_scale": scale}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = save_hf_dir(reference, tmp)
        for name, dtype, tolerance in (("f32", jnp.float32, F32_TOLERANCE), ("bf16", jnp.bfloat16, BF16_TOLERANCE)):
            from flax import nnx

            graphdef, state = nnx.split(hf_io.load_hf(hf_dir, compute_dtype=dtype))
            sharding = jax.sharding.SingleDeviceSharding(ctx.mesh.devices.flat[0])
            forward = jax.jit(lambda st, t, p, s: nnx.merge(graphdef, st)(t, p, s).astype(jnp.float32))
            if ctx.dry_run:
                arr = jax.ShapeDtypeStruct(tokens.shape, jnp.int32, sharding=sharding)
                out[name] = {"compiled": compile_report(forward, _sds_tree(state, sharding), arr, arr, arr),
                             "tolerance": tolerance}
                continue
            # f32 matmuls on GPUs default to TF32; the f32 check asks for full precision.
            with jax.default_matmul_precision("highest" if dtype == jnp.float32 else "default"):
                got = np.asarray(forward(jax.device_put(state, sharding), tokens, positions, segments))
            err = float(np.abs(got - want)[mask > 0].max()) / scale
            out[name] = {"max_rel_diff": err, "tolerance": tolerance, "passed": err <= tolerance}
    out["passed"] = ctx.dry_run or all(out[k]["passed"] for k in ("f32", "bf16"))
    return out


def _attention_inputs(seq: int, heads: int, kv_heads: int, head_dim: int, seed: int = 0):
    """Packed rows: three documents of uneven length and a padded tail, in natural token order."""
    import numpy as np

    rng = np.random.default_rng(seed)
    bounds = [0, seq * 3 // 8, seq * 5 // 8, seq * 15 // 16, seq]  # last part is padding
    segments = np.zeros((1, seq), np.int32)
    positions = np.zeros((1, seq), np.int32)
    for i, (a, b) in enumerate(zip(bounds[:-2], bounds[1:-1])):
        segments[0, a:b] = i + 1
        positions[0, a:b] = np.arange(b - a)
    q = rng.standard_normal((1, seq, heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((1, seq, kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((1, seq, kv_heads, head_dim)).astype(np.float32)
    return q, k, v, positions, segments


def check_attention(ctx: Context, *, seq: int = 8192, cp: int = 4) -> dict:
    """The platform's fused kernel in the two forms training uses: the packed layout (natural token order, one
    call per row) and context parallelism's per-device form (queries against all-gathered K/V in the load-balanced
    chunk order, the mask as cuDNN's bias), here with the whole sequence on one device."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from t3rl_jax.models import attention as ref_attention
    from t3rl_jax.models import context_parallel
    from t3rl_jax.models.attention_backends import get_attention, resolve_backend

    platform = "cuda" if ctx.dry_run else ctx.mesh.devices.flat[0].platform
    backend = resolve_backend("auto", platform, dtype=jnp.bfloat16)
    q, k, v, positions, segments = _attention_inputs(seq, heads=32, kv_heads=8, head_dim=128)
    order = context_parallel.load_balance_order(seq, cp)
    cp_local = context_parallel._gathered_masked_attention("sequence", "cudnn")
    token = jax.sharding.PartitionSpec()

    def cp_form(q, k, v, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids):
        # The per-device function under shard_map, on a one-device `sequence` axis: the all-gather is the identity.
        return jax.shard_map(cp_local, mesh=ctx.mesh, in_specs=(token,) * 7, out_specs=token, check_vma=False)(
            q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids)

    def loss_of(fn, dtype):
        def loss(q, k, v, pos, seg, weight):
            out = fn(q.astype(dtype), k.astype(dtype), v.astype(dtype), q_positions=pos, kv_positions=pos,
                     q_segment_ids=seg, kv_segment_ids=seg).astype(jnp.float32)
            return jnp.sum(out * weight), out
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

    weight = np.random.default_rng(1).standard_normal(q.shape).astype(np.float32)
    cases = {"packed": (loss_of(get_attention(backend, platform=platform), jnp.bfloat16), np.arange(seq)),
             "cp_load_balanced": (loss_of(cp_form, jnp.bfloat16), order)}
    out = {"backend": backend, "seq": seq, "cp_order": cp, "tolerance": ATTENTION_TOLERANCE}
    if ctx.dry_run:
        sharding = jax.sharding.SingleDeviceSharding(ctx.mesh.devices.flat[0])
        args = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
                for x in (q, k, v, positions, segments, weight)]
        for name, (fn, _) in cases.items():
            report = compile_report(fn, *args)
            out[name] = {"compiled": report,
                         "fused_kernel_in_hlo": any(c.startswith("__cudnn$fmha") for c in report["custom_calls"])}
        out["fused_kernel_in_hlo"] = all(out[n]["fused_kernel_in_hlo"] for n in cases)
        out["passed"] = out["fused_kernel_in_hlo"]
        return out
    with jax.default_matmul_precision("highest"):
        reference_fn = loss_of(ref_attention.attend, jnp.float32)
        for name, (fn, perm) in cases.items():
            args = [x[:, perm] for x in (q, k, v, positions, segments, weight)]
            (_, want), want_grads = reference_fn(*args)
            (_, got), got_grads = fn(*args)
            real = np.asarray(args[4]) > 0
            scale = float(np.abs(np.asarray(want)[real]).max())
            value_err = float(np.abs(np.asarray(got) - np.asarray(want))[real].max()) / scale
            grad_errs = []
            for g, w in zip(got_grads, want_grads):
                g, w = np.asarray(g), np.asarray(w)
                grad_errs.append(float(np.abs(g - w)[real].max() / max(np.abs(w[real]).max(), 1e-6)))
            out[name] = {"value_rel_diff": value_err, "grad_rel_diff": max(grad_errs),
                         "passed": value_err <= ATTENTION_TOLERANCE and max(grad_errs) <= ATTENTION_TOLERANCE}
    out["passed"] = all(out[n]["passed"] for n in cases)
    return out


def _one_device_config(preset: str, overrides: dict):
    from t3rl_jax.config import load_config

    mesh = {"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1, "mesh.sequence": 1}
    return load_config(preset, {**mesh, **overrides})


def _train_pieces(ctx: Context, seq: int):
    """The run's setup (model, optimizer, shardings; `run.setup.build_setup`) and GRPO step for Qwen3-4B on the
    context's one device."""
    from t3rl_jax.rl.train_step import GRPOStep
    from t3rl_jax.run.setup import build_setup

    cfg = _one_device_config("stage1", {"init_from": "", "train.max_seq_len": seq, "train.micro_batch_size": 1,
                                        "rollout.max_context_tokens": seq, "rollout.max_prefill_length": seq // 2,
                                        "rollout.max_response_tokens": seq // 2, "eval.max_response_tokens": seq // 2})
    setup = build_setup(cfg, devices=list(ctx.mesh.devices.flat))
    step = GRPOStep(setup.bundle.train_model(setup.abstract_params), setup.optimizer, setup.step_settings,
                    param_shardings=setup.param_shardings, opt_shardings=setup.opt_shardings,
                    batch_sharding=setup.batch_sharding)
    return setup, step


def _train_batch(seq: int, vocab: int, seed: int = 0) -> dict:
    """One row of 8k tokens: four packed episodes, loss on their second halves (like sampled replies)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    segments = np.repeat(np.arange(1, 5, dtype=np.int32), seq // 4)[None]
    positions = np.tile(np.arange(seq // 4, dtype=np.int32), 4)[None]
    tokens = rng.integers(0, vocab, (1, seq)).astype(np.int32)
    loss_mask = (positions >= seq // 8).astype(np.float32)
    return {"tokens": tokens, "positions": positions, "segment_ids": segments,
            "targets": np.roll(tokens, -1, axis=1), "loss_mask": loss_mask,
            "rollout_logprobs": np.full((1, seq), -2.0, np.float32),
            "advantages": np.repeat(rng.standard_normal(4).astype(np.float32), seq // 4)[None]}


def measured_bf16_peak(n: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of a large bf16 matmul on this device: the MFU denominator measured, not taken from a datasheet."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    matmul = jax.jit(lambda a, b: a @ b)
    seconds = timed(lambda: matmul(a, b), repeats=repeats, block=_block)
    return 2 * n ** 3 / seconds


def check_train(ctx: Context, *, seq: int = 8192) -> dict:
    import jax
    import numpy as np

    from t3rl_jax import flops as flops_lib
    from t3rl_jax import model_factory

    setup, step = _train_pieces(ctx, seq)
    cfg, bundle, batch_sharding = setup.cfg, setup.bundle, setup.batch_sharding
    batch = _train_batch(seq, bundle.config.vocab_size)
    slots = step.slots_for({k: v[None] for k, v in batch.items()})
    _, first, _ = step.functions_for(slots)
    out = {"model": f"{bundle.config.num_layers} layers, {bundle.config.num_params:,} params", "tokens": seq,
           "dtype": cfg.model.dtype, "remat": cfg.model.remat}
    if ctx.dry_run:
        mb = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding) for k, v in batch.items()}
        old = jax.ShapeDtypeStruct((1, seq), np.float32, sharding=batch_sharding)
        denominator = jax.ShapeDtypeStruct((), np.float32)
        out["grad"] = compile_report(first, bundle.abstract_params, mb, old, old, denominator,
                                     jax.ShapeDtypeStruct((), np.bool_))
        out["apply"] = compile_report(step._apply, bundle.abstract_params, setup.abstract_opt, bundle.abstract_params)
        out["fused_attention_in_hlo"] = any("cudnn" in c for c in out["grad"]["custom_calls"])
        out["passed"] = True
        return out
    params = model_factory.init_params(cfg, bundle)
    opt_state = jax.jit(setup.optimizer.init, out_shardings=setup.opt_shardings)(params)
    stacked = {k: v[None] for k, v in batch.items()}
    state = {"params": params, "opt": opt_state}

    def one_step():
        state["params"], state["opt"], metrics = step.update(state["params"], state["opt"], stacked,
                                                             old_logprobs=[batch["rollout_logprobs"]])
        return metrics

    seconds = timed(one_step, repeats=3, block=lambda m: m)  # update() returns host floats: already synced
    flops = flops_lib.packed_train_flops(bundle.config, batch["segment_ids"])
    peak = measured_bf16_peak()
    out.update(seconds=seconds, tokens_per_s=seq / seconds, model_tflops_per_s=flops / seconds / 1e12,
               measured_bf16_peak_tflops=peak / 1e12, mfu=flops / seconds / peak,
               note="MFU counts the gradient pass's model FLOPs (6N per token + causal attention); remat "
                    "recomputation and the optimizer update are overhead, as usual")
    out["passed"] = bool(np.isfinite(one_step()["loss"]))
    return out


def check_decode(ctx: Context, *, slots: int = 64, context: int = 4096, steps: int = 8) -> dict:
    import dataclasses as dc

    import jax
    import jax.numpy as jnp
    import numpy as np

    from t3rl_jax import model_factory
    from t3rl_jax.rollout.engine import Qwen3Engine

    setup, _ = _train_pieces(ctx, 8192)
    cfg, bundle = setup.cfg, setup.bundle
    cache_length = context + 2 * steps * 4
    held = context - steps  # every slot already holds this many tokens, so the window is the whole 4k context
    out = {"slots": slots, "context": context, "steps_per_call": steps}
    if ctx.dry_run:
        engine = Qwen3Engine(bundle.rollout_model(bundle.abstract_params), max_concurrent_decodes=slots,
                             max_prefill_length=1024, max_cache_length=cache_length,
                             cache_dtype=jnp.bfloat16, mesh=setup.mesh)
        jitted, args, static = engine.compile_targets(bundle.abstract_params, decode_steps=steps)["decode_loop"]
        out["decode_loop"] = compile_report(jitted, *args, **static)
        out["passed"] = True
        return out
    params = model_factory.init_params(cfg, bundle)
    engine = Qwen3Engine(bundle.rollout_model(params), max_concurrent_decodes=slots, max_prefill_length=1024,
                         max_cache_length=cache_length, cache_dtype=jnp.bfloat16, mesh=setup.mesh)
    state = engine.init_decode_state()
    rng = np.random.default_rng(0)
    # A filled cache (random keys/values) stands in for prefilled prompts: decode reads the same bytes.
    cache = state.cache
    filled = jnp.arange(cache.max_len)[None] < held
    cache = dc.replace(cache,
                       k=tuple(jax.random.normal(jax.random.key(i), x.shape, x.dtype) for i, x in enumerate(cache.k)),
                       v=tuple(jax.random.normal(jax.random.key(100 + i), x.shape, x.dtype)
                               for i, x in enumerate(cache.v)),
                       positions=jnp.broadcast_to(jnp.arange(cache.max_len, dtype=jnp.int32), cache.positions.shape),
                       segment_ids=jnp.where(filled, 1, cache.segment_ids).astype(jnp.int32),
                       lengths=jnp.full((slots,), held, jnp.int32))
    state = dc.replace(state, cache=cache, active=jnp.ones((slots,), bool),
                       tokens=jnp.asarray(rng.integers(0, 1000, slots), jnp.int32),
                       limits=jnp.full((slots,), cache.max_len, jnp.int32),
                       seeds=jnp.arange(slots, dtype=jnp.uint32))
    def fresh_call():
        # generate_steps donates its state, and a slot may stop early: every call decodes a fresh copy of the
        # 64 live slots (the copy's time is measured apart and taken off).
        _, tokens, *_ = engine.generate_steps(params, jax.tree.map(jnp.copy, state), steps, context_bound=context)
        return tokens

    seconds = timed(fresh_call, repeats=5, block=_block)
    copy_seconds = timed(lambda: jax.tree.map(jnp.copy, state), repeats=5, block=_block)
    seconds = max(seconds - copy_seconds, 1e-9)
    c = bundle.config
    weight_bytes = c.num_params * 2  # bf16 weights read once per step
    kv_bytes = slots * context * c.num_layers * 2 * c.num_kv_heads * c.head_dim * 2
    per_step = seconds / steps
    kind = ctx.device_kind
    bandwidth = next((bw for name, bw in HBM_BYTES_PER_S.items() if name in kind), HBM_BYTES_PER_S["H200"])
    out.update(seconds_per_call=seconds, tokens_per_s=slots * steps / seconds,
               bytes_per_step=weight_bytes + kv_bytes, roofline_fraction=(weight_bytes + kv_bytes) / per_step
               / bandwidth, hbm_bytes_per_s=bandwidth)
    out["passed"] = True
    return out


def check_tiny(ctx: Context) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        cmd = [sys.executable, "-m", "t3rl_jax.main", "--config=tiny", f"--config.workdir={workdir}",
               "--config.train.num_steps=2", "--config.eval.every_steps=2"]
        if ctx.dry_run:
            cmd.append("--config.dry_run=True")
        env = dict(os.environ)
        if not ctx.dry_run:
            env.pop("JAX_PLATFORMS", None)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        out = {"command": " ".join(cmd[1:]), "seconds": round(time.perf_counter() - t0, 1),
               "returncode": proc.returncode}
        if proc.returncode:
            out["stderr_tail"] = proc.stderr[-3000:]
        elif not ctx.dry_run:
            metrics = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
            out["steps_logged"] = len(metrics)
            out["last_loss"] = metrics[-1].get("loss")
        out["passed"] = proc.returncode == 0
        return out


# ---------------------------------------------------------------------------------------------------- driver
def make_context(dry_run: bool) -> Context:
    import jax
    import numpy as np
    from jax.sharding import Mesh

    axes = ("data", "fsdp", "tensor", "sequence")
    if dry_run:
        from t3rl_jax.accel import targets

        mesh = targets.mesh_for("h200", {a: 1 for a in axes})
        return Context(True, mesh, mesh.devices.flat[0].device_kind)
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if not gpus:
        raise SystemExit(f"no GPU visible to jax ({jax.devices()}); run with --dry_run to compile for an H200 "
                         "on this machine instead")
    mesh = Mesh(np.asarray(gpus[:1]).reshape((1,) * len(axes)), axes)
    return Context(False, mesh, gpus[0].device_kind)


def table(results: dict) -> str:
    def headline(name, r):
        if "error" in r:
            return r["error"].splitlines()[-1][:90]
        if name == "parity":
            return " ".join(f"{k}={r[k].get('max_rel_diff', 'compiled')}" for k in ("f32", "bf16") if k in r)
        if name == "attention":
            if "fused_kernel_in_hlo" in r:
                return f"{r['backend']}: fused kernel in both forms' HLO={r['fused_kernel_in_hlo']}"
            return (f"{r['backend']}: packed {r['packed']['value_rel_diff']:.2e}/{r['packed']['grad_rel_diff']:.2e}"
                    f" cp {r['cp_load_balanced']['value_rel_diff']:.2e}/{r['cp_load_balanced']['grad_rel_diff']:.2e}")
        if name == "train":
            if "grad" in r:
                gib = (r["grad"]["argument_bytes"] + r["grad"]["temp_bytes"]) / 2**30
                return f"grad compiled, {gib:.1f} GiB args+temp, cuDNN attention={r['fused_attention_in_hlo']}"
            return f"{r['tokens_per_s']:.0f} tok/s, MFU {r['mfu']:.1%} (peak {r['measured_bf16_peak_tflops']:.0f} TF)"
        if name == "decode":
            if "decode_loop" in r:
                return f"decode loop compiled, temp {r['decode_loop']['temp_bytes'] / 2**30:.1f} GiB"
            return f"{r['tokens_per_s']:.0f} tok/s, {r['roofline_fraction']:.1%} of HBM roofline"
        if name == "tiny":
            return f"rc={r['returncode']} in {r['seconds']} s"
        return ""

    lines = [f"{'check':<10} {'result':<7} detail"]
    for name, r in results.items():
        lines.append(f"{name:<10} {'pass' if r.get('passed') else 'FAIL':<7} {headline(name, r)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry_run", action="store_true", help="compile every check for an H200 on this machine")
    parser.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    parser.add_argument("--out", default="", help="also write the JSON here")
    args = parser.parse_args(argv)
    wanted = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(wanted) - set(CHECKS))
    if unknown:
        parser.error(f"unknown checks {unknown}; known: {', '.join(CHECKS)}")
    if args.dry_run:
        from t3rl_jax.accel import targets

        targets.prepare_environment()
    ctx = make_context(args.dry_run)
    results = {}
    for name in wanted:
        t0 = time.perf_counter()
        try:
            results[name] = globals()[f"check_{name}"](ctx)
        except Exception as e:  # one broken check must not hide the others' results
            results[name] = {"passed": False, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"}
        results[name]["wall_s"] = round(time.perf_counter() - t0, 1)
        print(f"[{name}] {'passed' if results[name]['passed'] else 'FAILED'} in {results[name]['wall_s']} s",
              flush=True)
    report = {"device": ctx.device_kind, "dry_run": ctx.dry_run, "results": results}
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(table(results))
    ok = all(r["passed"] for r in results.values())
    print(f"gpu_check={'passed' if ok else 'failed'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
