"""Stage 2's gradient step (CP 4, 49,152-token rows) compiled for 8 H200s with logits at every position and with
logits only at loss positions compacted per sequence shard (`rl/train_step.compact_to_loss_slots`): per-device
temp memory and the collectives of each, so a claim that the compaction moves no activations can be checked.

    python benchmarks/cp_compact_logits.py                  # 8 H200s (compile-only, t3rl_jax/accel)
    python benchmarks/cp_compact_logits.py --slots 1024     # logit positions per sequence shard

Nothing is allocated. Last line: `ratio=<temp bytes compacted / every position>` and whether the two programs
all-gather the same arrays.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def collectives(hlo: str) -> dict[str, collections.Counter]:
    """Result shapes of each collective kind in an HLO text (async starts and plain ops alike)."""
    out: dict[str, collections.Counter] = {k: collections.Counter() for k in COLLECTIVES}
    for line in hlo.splitlines():
        m = re.match(rf"\s*\S+ = (.*) ({'|'.join(COLLECTIVES)})(-start)?\(", line)
        if m:
            out[m.group(2)][m.group(1)] += 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="h200")
    parser.add_argument("--config", default="stage2")
    parser.add_argument("--slots", type=int, default=0, help="logit positions per shard (default: a quarter)")
    args = parser.parse_args()
    sys.path.insert(0, _ROOT)
    sys.path.insert(0, os.path.join(_ROOT, "scripts"))
    from fit_check import force_host_devices

    force_host_devices(8)
    from t3rl_jax.accel import targets
    from t3rl_jax.accel.compile_report import compile_function
    from t3rl_jax.config import load_config
    from t3rl_jax.rl.train_step import GRPOStep
    from t3rl_jax.step_analysis import abstract_train_step

    cfg = load_config(args.config, [])
    step_args = abstract_train_step(cfg, targets.compile_only_devices(args.target, 8))
    s = step_args.setup
    step = GRPOStep(s.bundle.train_model(s.bundle.abstract_params), s.optimizer, s.step_settings,
                    param_shardings=s.bundle.param_shardings, opt_shardings=s.opt_shardings,
                    batch_sharding=s.batch_sharding)
    block = cfg.train.max_seq_len // step.length_shards
    slots = args.slots or block // 4
    print(f"{args.config} on {args.target} x 8, mesh {dict(s.mesh.shape)}: {cfg.train.max_seq_len} tokens a row, "
          f"{step.length_shards} length shards of {block}; compacted: {slots} logit positions per shard")
    results = {}
    for name, n in (("every position", None), ("compacted", slots)):
        r = compile_function(name, step.functions_for(n)[1], step_args.grad_args, keep_hlo=True)
        results[name] = (r.temp_bytes, collectives(r.hlo_text))
        counts = ", ".join(f"{k} {sum(v.values())}" for k, v in results[name][1].items() if v)
        print(f"{name:>15}: temp {r.temp_bytes / 2**30:.2f} GiB, compile {r.compile_s:.0f} s; {counts}")
    (full_temp, full), (compact_temp, compact) = results["every position"], results["compacted"]
    same = full["all-gather"] == compact["all-gather"]
    print(f"ratio={compact_temp / full_temp:.3f} same_all_gathers={same}")


if __name__ == "__main__":
    main()
