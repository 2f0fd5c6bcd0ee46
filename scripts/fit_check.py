"""Does a training configuration fit in device memory? Compile it and ask XLA, allocating nothing.

    python scripts/fit_check.py --preset qwen3-4b-instruct-2507 --mesh 1,2,1,4 --seq_len 32768 --micro_batch 2
    python scripts/fit_check.py --config=stage2          # mesh, seq len, micro-batch, dtypes from the config

Builds the real Qwen3 shapes with `nnx.eval_shape`, the mesh on fake CPU devices, abstract
`jax.ShapeDtypeStruct` inputs, and lowers + compiles one update: forward and backward of the
token-level GRPO policy loss on one micro-batch plus the AdamW step (until the trainer's GRPO step
exists; then compile that instead). Prints XLA's per-device `memory_analysis()` and
`cost_analysis()` FLOPs (XLA counts a loop body once, so with the layer scan that figure is about
one layer's; the analytic model FLOPs are printed beside it); the last line is
`per_device_bytes=<int>` = arguments + outputs - donated aliases + temporaries + code.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time


def _parse_mesh(text: str) -> tuple[int, int, int, int]:
    sizes = tuple(int(x) for x in text.split(","))
    if len(sizes) != 4 or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"--mesh wants four positive sizes data,fsdp,tensor,sequence; got {text!r}")
    return sizes


def _force_host_devices(count: int) -> None:
    """Fake CPU devices must be requested before jax is imported."""
    if "jax" in sys.modules:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


@dataclasses.dataclass(frozen=True)
class FitSpec:
    """Everything that decides the compiled step's shapes and layout."""

    preset: str = "qwen3-4b-instruct-2507"
    mesh: tuple[int, int, int, int] = (1, 2, 1, 4)
    seq_len: int = 32768
    micro_batch: int = 2
    num_layers: int | None = None  # None = the preset's
    vocab_size: int | None = None  # None = the preset's
    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    remat: str = "full"
    cp_strategy: str = "all_gather"
    attention_block: int = 512
    logprob_chunks: int = 8
    fsdp_over_data: bool = False
    fsdp_over_sequence: bool = True


def spec_from_config(name: str, devices: int = 8) -> FitSpec:
    """FitSpec from a run config (`t3rl_jax.config`); a -1 mesh axis fills `devices`."""
    from t3rl_jax import sharding as sh
    from t3rl_jax.config import load_config

    cfg = load_config(name)
    model, train = cfg.model, cfg.train
    return FitSpec(
        preset=model.preset.replace("_", "-"), mesh=sh.mesh_shape(cfg.mesh, devices),
        seq_len=int(train.max_seq_len), micro_batch=int(train.micro_batch_size),
        num_layers=model.num_layers, vocab_size=model.vocab_size, param_dtype=model.param_dtype,
        compute_dtype=model.dtype, remat=model.remat)


def strided_token_logprobs(model, hidden, targets, num_chunks: int):
    """log p(target) per token without materialising [B, T, vocab] logits.

    Chunk j holds tokens j, j+m, j+2m, ...: the strided split keeps each chunk's token axis sharded
    like the sequence (a contiguous split would put whole chunks on single devices). Each chunk's
    logits are recomputed in the backward instead of saved.
    """
    import jax
    import jax.numpy as jnp

    from t3rl_jax.rl.entropy import token_logprobs

    b, t, e = hidden.shape
    if t % num_chunks:
        raise ValueError(f"sequence length {t} is not divisible by logprob_chunks {num_chunks}")
    h = jnp.moveaxis(hidden.reshape(b, t // num_chunks, num_chunks, e), 2, 0)
    tg = jnp.moveaxis(targets.reshape(b, t // num_chunks, num_chunks), 2, 0)

    @jax.checkpoint
    def chunk(args):
        h_c, tg_c = args
        return token_logprobs(model.logits_from_hidden(h_c), tg_c)

    logp = jax.lax.map(chunk, (h, tg))
    return jnp.moveaxis(logp, 0, 2).reshape(b, t)


def build_step(spec: FitSpec, devices=None, with_optimizer: bool = True):
    """(jitted step, its abstract arguments, model config, mesh) for `spec`.

    The step is the AdamW update on (params, opt_state, batch), or with `with_optimizer=False`
    only forward + backward: (params, batch) -> (loss, grads).
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from t3rl_jax import sharding as sh
    from t3rl_jax.models import context_parallel as cp
    from t3rl_jax.models.model_config import preset
    from t3rl_jax.models.qwen3 import Qwen3
    from t3rl_jax.rl.grpo import LossSettings, grpo_loss

    model_cfg = preset(spec.preset)
    overrides = {k: v for k, v in (("num_layers", spec.num_layers), ("vocab_size", spec.vocab_size)) if v}
    model_cfg = dataclasses.replace(model_cfg, **overrides)
    devices = list(jax.devices())[: math.prod(spec.mesh)] if devices is None else devices
    mesh = sh.make_mesh(dict(zip(sh.MESH_AXES, spec.mesh)), devices=devices)
    rules = sh.logical_axis_rules(fsdp_over_data=spec.fsdp_over_data, fsdp_over_sequence=spec.fsdp_over_sequence)
    sh.validate(mesh, seq_len=spec.seq_len, num_heads=model_cfg.num_heads, num_kv_heads=model_cfg.num_kv_heads,
                batch_size=spec.micro_batch, rules=rules)
    attention_fn = cp.make_context_parallel_attention(mesh, rules, strategy=spec.cp_strategy,
                                                      block_size=spec.attention_block)
    constrain = sh.make_activation_constraint(mesh, rules)
    abstract_model = nnx.eval_shape(lambda: Qwen3(
        model_cfg, rngs=nnx.Rngs(0), param_dtype=jnp.dtype(spec.param_dtype),
        compute_dtype=jnp.dtype(spec.compute_dtype), scan_layers=True, remat_policy=spec.remat,
        attention_fn=attention_fn, activation_constraint=constrain))
    graphdef, abstract_params = nnx.split(abstract_model)
    param_shardings = sh.state_shardings(abstract_params, mesh, rules)

    # T3RL's stage recipe: AdamW(0.9, 0.999), weight decay 0.01, clip 1.0, lr 1e-6.
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-6, b1=0.9, b2=0.999, weight_decay=0.01))
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_shardings = sh.optax_state_shardings(abstract_opt, abstract_params, param_shardings, mesh)

    b, t = spec.micro_batch, spec.seq_len
    ints = jax.ShapeDtypeStruct((b, t), jnp.int32)
    floats = jax.ShapeDtypeStruct((b, t), jnp.float32)
    abstract_batch = {"tokens": ints, "positions": ints, "segment_ids": ints, "targets": ints,
                      "loss_mask": floats, "old_logprobs": floats, "advantages": floats}
    batch_shardings = sh.batch_shardings(abstract_batch, mesh, rules)
    settings = LossSettings()

    def loss_fn(params, batch):
        model = nnx.merge(graphdef, params)
        hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
        logp = strided_token_logprobs(model, hidden, batch["targets"], spec.logprob_chunks)
        loss, _ = grpo_loss(settings, logp=logp, old_logp=batch["old_logprobs"], advantages=batch["advantages"],
                            mask=batch["loss_mask"])
        return loss

    if not with_optimizer:
        jitted = jax.jit(jax.value_and_grad(loss_fn), in_shardings=(param_shardings, batch_shardings),
                         out_shardings=(None, param_shardings))
        return jitted, (abstract_params, abstract_batch), model_cfg, mesh

    def update(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    jitted = jax.jit(update, in_shardings=(param_shardings, opt_shardings, batch_shardings),
                     out_shardings=(param_shardings, opt_shardings, None), donate_argnums=(0, 1))
    return jitted, (abstract_params, abstract_opt, abstract_batch), model_cfg, mesh


def compile_and_measure(jitted, abstract_args) -> dict:
    """Per-device memory (bytes) and FLOPs of the compiled step, plus compile seconds."""
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
    out["per_device_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                               + out["temp_bytes"] + out["code_bytes"])
    return out


def analytic_flops(model_cfg, tokens: int, seq_len: int, micro_batch: int) -> float:
    """Model FLOPs of forward + backward: 6 * params * tokens + causal attention (12 * L * T^2/2 * H * D per seq)."""
    dense = 6 * model_cfg.num_params * tokens
    attn = 12 * model_cfg.num_layers * model_cfg.num_heads * model_cfg.head_dim * (seq_len ** 2 / 2) * micro_batch
    return float(dense + attn)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run config name (configs/NAME.py); replaces --preset .. --remat")
    parser.add_argument("--devices", type=int, default=8, help="device count a -1 mesh axis of --config fills")
    parser.add_argument("--preset", default=FitSpec.preset)
    parser.add_argument("--mesh", type=_parse_mesh, default=FitSpec.mesh, help="data,fsdp,tensor,sequence")
    parser.add_argument("--seq_len", type=int, default=FitSpec.seq_len)
    parser.add_argument("--micro_batch", type=int, default=FitSpec.micro_batch)
    parser.add_argument("--num_layers", type=int, default=None)
    parser.add_argument("--param_dtype", default=FitSpec.param_dtype)
    parser.add_argument("--compute_dtype", default=FitSpec.compute_dtype)
    parser.add_argument("--remat", default=FitSpec.remat)
    parser.add_argument("--cp_strategy", default=FitSpec.cp_strategy)
    parser.add_argument("--attention_block", type=int, default=FitSpec.attention_block)
    parser.add_argument("--logprob_chunks", type=int, default=FitSpec.logprob_chunks)
    parser.add_argument("--no_fsdp_over_sequence", action="store_true",
                        help="replicate weights across the sequence axis instead of sharding them there too")
    args = parser.parse_args(argv)

    _force_host_devices(args.devices if args.config else math.prod(args.mesh))
    # Layout knobs the run config does not carry apply on top of --config too.
    layout = dict(cp_strategy=args.cp_strategy, attention_block=args.attention_block,
                  logprob_chunks=args.logprob_chunks, fsdp_over_sequence=not args.no_fsdp_over_sequence)
    if args.config:
        spec = dataclasses.replace(spec_from_config(args.config, args.devices), **layout)
    else:
        spec = FitSpec(preset=args.preset, mesh=args.mesh, seq_len=args.seq_len, micro_batch=args.micro_batch,
                       num_layers=args.num_layers, param_dtype=args.param_dtype, compute_dtype=args.compute_dtype,
                       remat=args.remat, **layout)
    jitted, abstract_args, model_cfg, mesh = build_step(spec)
    print(f"spec: {spec}")
    print(f"mesh: {dict(mesh.shape)}  model: {model_cfg.num_layers} layers, {model_cfg.num_params:,} params")
    m = compile_and_measure(jitted, abstract_args)
    gib = lambda n: f"{n / 2**30:8.2f} GiB"
    for key in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "code_bytes", "per_device_bytes"):
        print(f"{key:>18}: {gib(m[key])}  ({m[key]:,})")
    tokens = spec.micro_batch * spec.seq_len
    model_flops = analytic_flops(model_cfg, tokens, spec.seq_len, spec.micro_batch)
    print(f"{'xla_flops':>18}: {m['flops']:.4g} per device (XLA cost analysis; loop bodies may be counted once)")
    print(f"{'model_flops':>18}: {model_flops:.4g} per micro-batch of {tokens:,} tokens (6*N*tokens + attention), "
          f"{model_flops / math.prod(spec.mesh):.4g} per device")
    print(f"{'compile':>18}: {m['compile_s']:.1f} s")
    print(f"per_device_bytes={m['per_device_bytes']}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    raise SystemExit(main())
