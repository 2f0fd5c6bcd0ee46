"""Entry point: `python -m t3rl_jax.main --config=NAME [--config.KEY=VALUE ...] [--chain]`.

Runs one curriculum stage (a preset from `configs/`). `--chain` goes on through the presets named by `next_stage`,
each starting from the previous stage's HF export. `--config.dry_run=True` builds the model, mesh, shardings and
optimizer for the real shapes and lowers the train step without allocating weights.
"""

from __future__ import annotations

import logging
import sys

from t3rl_jax.config import ConfigError, config_from_argv, load_config


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chain = "--chain" in argv
    argv = [a for a in argv if a != "--chain"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg, rest = config_from_argv(argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if rest:
        print(f"unknown arguments: {' '.join(rest)}", file=sys.stderr)
        return 2
    # Imported after argument checks so `--help`-style mistakes answer fast.
    from t3rl_jax.step_analysis import dry_run
    from t3rl_jax.trainer import Trainer

    while True:
        if cfg.dry_run:
            report = dry_run(cfg)
            print(f"dry run ok: {report.num_params:,} parameters, mesh {report.mesh}, train step lowered")
            return 0
        use_compilation_cache(cfg.compilation_cache_dir)
        result = Trainer(cfg).run()
        print(f"stage {cfg.stage} finished at step {result['step']}"
              + (f", val accuracy {result['val/accuracy/overall']:.3f}" if "val/accuracy/overall" in result else ""))
        if not (chain and cfg.next_stage):
            if cfg.next_stage:
                print(f"next stage: python -m t3rl_jax.main --config={cfg.next_stage}")
            return 0
        cfg = load_config(cfg.next_stage)


def use_compilation_cache(directory: str) -> None:
    """Persist compiled executables in `directory` (JAX's compilation cache); "" leaves it off."""
    if directory:
        import os

        import jax

        jax.config.update("jax_compilation_cache_dir", os.path.abspath(directory))


if __name__ == "__main__":
    sys.exit(main())
