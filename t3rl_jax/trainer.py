"""Compatibility name for the run layer (`t3rl_jax.run`): `Trainer(cfg)` is `build_setup(cfg)` plus `.run()`.

Kept only while `step_analysis.py` and older callers still say `Trainer(cfg)`; new code uses
`t3rl_jax.run.setup.build_setup` and `t3rl_jax.run.loop.train`.
"""

from __future__ import annotations

from t3rl_jax.run.hooks import TrainingStopped
from t3rl_jax.run.loop import train
from t3rl_jax.run.setup import RunSetup, build_setup

__all__ = ["Trainer", "TrainingStopped"]


class Trainer:
    """The RunSetup's attributes (mesh, bundle, optimizer, shardings, ...) and `run()`."""

    def __init__(self, cfg):
        self.setup: RunSetup = build_setup(cfg)

    def __getattr__(self, name):
        if "setup" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["setup"], name)

    def run(self) -> dict:
        return train(self.setup)
