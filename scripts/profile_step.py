"""Profile one train step and one decode step of a config's model, standalone, and print the top ops by time.

    python scripts/profile_step.py --config=tiny [--config.KEY=VALUE ...] [--seq_len 512] [--decode_steps 8]
        [--decode_cache 1024] [--top 15] [--out DIR]

Builds the model as the trainer does (mesh, shardings, `init_from` or random weights when it is empty), then:
- train: `GRPOStep.update` on a synthetic packed batch (train.micro_batch_size rows of --seq_len tokens, two
  sequences per row, loss on each sequence's second half);
- decode: `Qwen3Engine.generate_steps` for --decode_steps steps over rollout.max_concurrent_decodes slots holding a
  short prompt each, with a cache of --decode_cache tokens (default: rollout.max_context_tokens).
Each is compiled and run once untimed, then traced with `jax.profiler` into OUT/train/profile and
OUT/decode/profile (OUT defaults to WORKDIR/profile_step); open them with `xprof --logdir OUT/train/profile`.
With `--config.dump_hlo=True` the optimized HLO of both steps is written to OUT/hlo/.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def synthetic_batch(rows: int, length: int, vocab: int, seed: int = 0) -> dict:
    """One micro-batch [1, rows, length] of two packed sequences per row, in `rl.batching`'s key layout."""
    import numpy as np

    if length < 4:
        raise ValueError(f"--seq_len must be >= 4, got {length}")
    rng = np.random.default_rng(seed)
    split = length // 2
    seg = np.where(np.arange(length) < split, 1, 2)[None].repeat(rows, 0).astype(np.int32)
    pos = np.where(np.arange(length) < split, np.arange(length), np.arange(length) - split)[None].repeat(rows, 0)
    tokens = rng.integers(0, vocab, (rows, length)).astype(np.int32)
    targets = np.roll(tokens, -1, axis=1)
    loss_mask = ((pos >= split // 2) & (np.roll(seg, -1, axis=1) == seg)).astype(np.float32)
    batch = dict(tokens=tokens, positions=pos.astype(np.int32), segment_ids=seg, targets=targets,
                 loss_mask=loss_mask, rollout_logprobs=np.full((rows, length), -1.0, np.float32),
                 advantages=(rng.integers(0, 2, (rows, length)) * 2 - 1).astype(np.float32))
    return {k: v[None] for k, v in batch.items()}


def traced(out_dir: str, fn):
    """Run fn once untimed (compile), then once inside a one-step ProfileSession; returns (seconds, trace files)."""
    import jax

    from t3rl_jax import profiling

    jax.block_until_ready(fn())
    session = profiling.ProfileSession(out_dir, start_step=0, num_steps=1)
    with session.step(0):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        seconds = time.perf_counter() - start
    session.close()
    return seconds, profiling.latest_trace(session.trace_dir)


def main(argv=None) -> int:
    from t3rl_jax.config import config_from_argv

    cfg, rest = config_from_argv(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--decode_steps", type=int, default=8)
    parser.add_argument("--decode_cache", type=int, default=0, help="0 = rollout.max_context_tokens")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", default="")
    args = parser.parse_args(rest)

    import jax
    import numpy as np
    from jax.sharding import NamedSharding

    from t3rl_jax import flops, model_factory, profiling
    from t3rl_jax import sharding as sh
    from t3rl_jax.rl.grpo import LossSettings
    from t3rl_jax.rl.train_step import GRPOStep, StepSettings, make_optimizer
    from t3rl_jax.rollout.engine import Qwen3Engine, SamplingSettings

    out = args.out or os.path.join(cfg.workdir, "profile_step")
    mesh = sh.make_mesh(cfg.mesh)
    bundle = model_factory.build(cfg, mesh)
    mcfg = bundle.config
    params = model_factory.init_params(cfg, bundle)
    optimizer = make_optimizer(cfg.train)
    opt_state = jax.jit(optimizer.init)(params)
    settings = StepSettings(LossSettings.from_algo_config(cfg.algo), temperature=max(cfg.rollout.temperature, 1e-6),
                            old_logprobs="rollout")
    batch_sharding = NamedSharding(mesh, sh.logical_to_spec(("batch", "length"), mesh=mesh))
    step = GRPOStep(bundle.train_model(params), optimizer, settings, param_shardings=bundle.param_shardings,
                    batch_sharding=batch_sharding, donate=False)
    batch = synthetic_batch(cfg.train.micro_batch_size, args.seq_len, mcfg.vocab_size, cfg.seed)

    def train_once():
        with profiling.scope("train"):
            return step.update(params, opt_state, batch)[0]

    train_s, train_trace = traced(os.path.join(out, "train"), train_once)
    train_flops = flops.packed_train_flops(mcfg, batch["segment_ids"][0])

    cache = args.decode_cache or cfg.rollout.max_context_tokens
    slots = cfg.rollout.max_concurrent_decodes
    engine = Qwen3Engine(bundle.rollout_model(params), max_concurrent_decodes=slots,
                         max_prefill_length=min(cfg.rollout.max_prefill_length, cache), max_cache_length=cache,
                         sampling=SamplingSettings(temperature=cfg.rollout.temperature), mesh=mesh,
                         stop_ids=(mcfg.vocab_size,))  # out of vocabulary: no slot stops early
    state = engine.init_decode_state()
    prompt = np.random.default_rng(cfg.seed).integers(0, mcfg.vocab_size, 16)
    with profiling.scope("prefill"):
        for slot in range(slots):
            state = engine.extend_slot(None, state, slot, prompt, reset=True, seed=slot)[0]
    jax.block_until_ready(state)
    # generate_steps donates the state: keep a copy so every run starts from the same prefilled slots.
    prefilled = jax.tree.map(lambda x: x.copy(), state)

    def decode_once():
        with profiling.scope("decode"):
            return engine.generate_steps(engine.params, jax.tree.map(lambda x: x.copy(), prefilled),
                                         args.decode_steps)[1]

    decode_s, decode_trace = traced(os.path.join(out, "decode"), decode_once)
    decode_flops = slots * args.decode_steps * flops.decode_flops_per_token(mcfg, 16 + args.decode_steps / 2)

    if cfg.dump_hlo:
        # The micro-batch gradient function `update` has just compiled for this batch (same static slot count).
        mb = {k: v[0] for k, v in batch.items()}
        grad_fn = step.functions_for(step.slots_for(batch))[1]
        profiling.dump_hlo(grad_fn, params, mb, mb["rollout_logprobs"], mb["rollout_logprobs"], np.float32(1.0),
                           np.bool_(False), path=os.path.join(out, "hlo", "train_grad.txt"))
        profiling.dump_hlo(engine.generate_function, engine.params, prefilled, num_steps=args.decode_steps,
                           path=os.path.join(out, "hlo", "decode_steps.txt"))
        print(f"HLO written to {os.path.join(out, 'hlo')}")

    devices = f"{len(mesh.devices.flat)} x {jax.devices()[0].device_kind}"
    print(f"config {cfg.stage}: {mcfg.num_layers} layers, hidden {mcfg.hidden_size}, vocab {mcfg.vocab_size}; "
          f"mesh {dict(mesh.shape)} on {devices}")
    for name, seconds, model_flops, trace in (
            (f"train step ({cfg.train.micro_batch_size} x {args.seq_len} tokens)", train_s, train_flops, train_trace),
            (f"decode ({slots} slots x {args.decode_steps} steps, cache {cache})", decode_s, decode_flops,
             decode_trace)):
        print(f"\n== {name}: {seconds * 1e3:.1f} ms, {model_flops / seconds / 1e9:.2f} model GFLOP/s; "
              f"trace {trace.run_dir}")
        if trace.trace_json:
            print(profiling.format_top_ops(profiling.op_self_times(trace.trace_json[0]), args.top))
    print(f"\nopen with: xprof --logdir {os.path.join(out, 'train', 'profile')} --port 8791")
    return 0


if __name__ == "__main__":
    sys.exit(main())
