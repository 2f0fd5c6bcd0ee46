"""Temp memory and HLO facts of a 2-layer attention forward+backward, compiled for an accelerator without one.

    JAX_PLATFORMS=cpu python benchmarks/attention_compile.py [--target h200] [--seq 8192] [--backends blockwise,cudnn]
    JAX_PLATFORMS=cpu python benchmarks/attention_compile.py --model [--sequence 4] [--backends blockwise,auto]

Qwen3-4B's attention shape (32 query / 8 KV heads of 128, bf16), one packed row of --seq tokens (three segments
and some padding) per device, batch sharded over the target's 8 devices (FSDP layout), two layers in a
`lax.scan` with remat like the train step. Per backend it prints the per-device temp bytes from
`memory_analysis()`, whether the optimized HLO holds a `conditional` inside a while loop, and which attention
custom calls it holds. The last line is `ratio=<temp bytes of the first backend / the last>`.

--model: the same facts for the gradient of the stage-1 model's hidden states (2 layers of Qwen3-4B, built by
`model_factory.build` with `model.attention=<backend>`, random weights, one row per data-parallel shard), on a
mesh of fsdp=8/S x sequence=S.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 32, 8, 128, 2


def compile_attention(attention_fn, mesh, seq: int, *, batch_per_device: int = 1):
    """Compiled fwd+bwd of a 2-layer attention stack on `mesh` (batch over every device)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    devices = mesh.devices.size
    b = batch_per_device * devices
    spec = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=spec)

    def loss(q, ks, vs, pos, seg):
        def layer(x, kv):
            k, v = kv
            out = attention_fn(x, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)
            return out, None

        out, _ = jax.lax.scan(jax.checkpoint(layer), q, (ks, vs))
        return jnp.sum(out.astype(jnp.float32))

    args = (sds((b, seq, HEADS, HEAD_DIM), jnp.bfloat16),
            jax.ShapeDtypeStruct((LAYERS, b, seq, KV_HEADS, HEAD_DIM), jnp.bfloat16,
                                 sharding=NamedSharding(mesh, P(None, tuple(mesh.axis_names)))),
            jax.ShapeDtypeStruct((LAYERS, b, seq, KV_HEADS, HEAD_DIM), jnp.bfloat16,
                                 sharding=NamedSharding(mesh, P(None, tuple(mesh.axis_names)))),
            sds((b, seq), jnp.int32), sds((b, seq), jnp.int32))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower().compile()


def compile_model(backend: str, mesh, seq: int):
    """Compiled gradient of a 2-layer stage-1 model's mean hidden state, attention chosen by `backend`."""
    import importlib

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from t3rl_jax import model_factory, sharding as sh

    cfg = importlib.import_module("configs.stage1").get_config()
    cfg.init_from = ""
    cfg.model.num_layers = LAYERS
    cfg.model.attention = backend
    bundle = model_factory.build(cfg, mesh)
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    tok = NamedSharding(mesh, sh.logical_to_spec(("batch", "length"), mesh=mesh))

    def loss(params, tokens, positions, segment_ids):
        hidden = bundle.train_model(params).hidden_states(tokens, positions, segment_ids)
        return hidden.astype(jnp.float32).mean()

    args = (bundle.abstract_params,) + tuple(jax.ShapeDtypeStruct((rows, seq), jnp.int32, sharding=tok)
                                             for _ in range(3))
    return jax.jit(jax.grad(loss)).trace(*args).lower().compile()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="h200")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--backends", default="blockwise,cudnn")
    parser.add_argument("--model", action="store_true", help="the 2-layer stage-1 model instead of bare attention")
    parser.add_argument("--sequence", type=int, default=1, help="context parallelism (--model only)")
    args = parser.parse_args(argv)

    from t3rl_jax.accel import targets

    targets.prepare_environment()
    from t3rl_jax.models import attention_backends, kernel_hlo

    n = targets.target(args.target).devices_per_slice
    cp = args.sequence if args.model else 1
    mesh = targets.mesh_for(args.target, {"data": 1, "fsdp": n // cp, "tensor": 1, "sequence": cp})
    temps = []
    for name in args.backends.split(","):
        if args.model:
            compiled = compile_model(name, mesh, args.seq)
        else:
            compiled = compile_attention(attention_backends.get_attention(name, mesh=mesh), mesh, args.seq)
        text = compiled.as_text()
        temp = compiled.memory_analysis().temp_size_in_bytes
        temps.append(temp)
        print(f"{args.target} {'model ' * args.model}{name} seq={args.seq} mesh={dict(mesh.shape)}: temp {temp / 2**20:.1f} MiB per device, "
              f"conditionals in loops {len(kernel_hlo.conditionals_in_loops(text))}, "
              f"fused attention calls {kernel_hlo.fused_attention_calls(text)}", flush=True)
    print(f"ratio={temps[0] / max(temps[-1], 1):.2f}")


if __name__ == "__main__":
    main()
