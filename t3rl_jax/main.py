"""Entry point: `python -m t3rl_jax.main --config=NAME [--config.KEY=VALUE ...] [--chain]`.

Runs one curriculum stage (a preset from `configs/`). `--chain` goes on through the presets named by `next_stage`,
each with the same command-line overrides (except the stage's own identity: `stage`, `next_stage`, `workdir`,
`init_from`), starting from the HF export the previous stage actually wrote, and in a workdir next to the previous
stage's. `--config.dry_run=True` builds the model, mesh, shardings and optimizer for the real shapes and lowers the
train step without allocating weights.
"""

from __future__ import annotations

import logging
import os
import sys

from t3rl_jax.config import ConfigError, export_dir, load_config, parse_config_args

# Keys that name one stage; a chained stage gets its own instead of the command line's.
STAGE_KEYS = ("stage", "next_stage", "workdir", "init_from")


def chained_overrides(overrides: list[str], previous, next_stage: str) -> list[str]:
    """The overrides for `next_stage` after the stage `previous` (a frozen config) finished."""
    kept = [o for o in overrides if o.partition("=")[0].strip() not in STAGE_KEYS]
    kept.append(f"init_from={export_dir(previous.workdir)}")
    if any(o.partition("=")[0].strip() == "workdir" for o in overrides):
        kept.append(f"workdir={os.path.join(os.path.dirname(previous.workdir.rstrip('/')), next_stage)}")
    return kept


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chain = "--chain" in argv
    argv = [a for a in argv if a != "--chain"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        name, overrides, rest = parse_config_args(argv)
        cfg = load_config(name, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if rest:
        print(f"unknown arguments: {' '.join(rest)}", file=sys.stderr)
        return 2
    # Imported after argument checks so `--help`-style mistakes answer fast.
    from t3rl_jax.run.loop import train
    from t3rl_jax.run.setup import build_setup
    from t3rl_jax.step_analysis import dry_run

    while True:
        try:
            if cfg.dry_run:
                report = dry_run(cfg)
                print(f"dry run ok: {report.num_params:,} parameters, mesh {report.mesh}, train step lowered")
                return 0
            use_compilation_cache(cfg.compilation_cache_dir)
            result = train(build_setup(cfg))
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            return 2
        print(f"stage {cfg.stage} finished at step {result['step']}"
              + (f" ({result['stop']})" if result.get("stop") else "")
              + (f", val accuracy {result['val/accuracy/overall']:.3f}" if "val/accuracy/overall" in result else ""))
        print_reward_rise(cfg.workdir)
        if result.get("stop") == "sigterm" or not cfg.next_stage:
            return 0
        if not chain:
            print(f"next stage: python -m t3rl_jax.main --config={cfg.next_stage} "
                  f"--config.init_from={export_dir(cfg.workdir)}")
            return 0
        overrides = chained_overrides(overrides, cfg, cfg.next_stage)
        try:
            cfg = load_config(cfg.next_stage, overrides)
        except ConfigError as e:
            print(f"config error in chained stage {cfg.next_stage}: {e}", file=sys.stderr)
            return 2


def print_reward_rise(workdir: str) -> None:
    """The stage's sampled-reward curve and its first-3 / last-3 comparison, last on stdout (the demo's proof of
    learning; plots/reward.png draws the same series). Nothing for runs of fewer than 6 logged steps."""
    import jax

    from t3rl_jax.evaluation import reward_rise_lines
    from t3rl_jax.metrics import read_metrics

    path = os.path.join(workdir, "metrics.jsonl")
    if jax.process_index() != 0 or not os.path.exists(path):
        return
    rows = [r for r in read_metrics(path) if "reward/mean" in r]
    if len(rows) >= 6:
        print("\n".join(reward_rise_lines(rows)))


def use_compilation_cache(directory: str) -> None:
    """Persist compiled executables in `directory` (JAX's compilation cache); "" leaves it off."""
    if directory:
        import jax

        jax.config.update("jax_compilation_cache_dir", os.path.abspath(directory))


if __name__ == "__main__":
    sys.exit(main())
