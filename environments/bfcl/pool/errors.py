"""What a pool's futures and calls raise."""

from __future__ import annotations


class EpisodeFailed(RuntimeError):
    """The episode's worker crashed, timed out or could not start; the episode is scored as failed."""

    def __init__(self, key: int, reason: str):
        super().__init__(f"episode {key} failed: {reason}")
        self.key, self.reason = key, reason


class EnvRequestError(RuntimeError):
    """A request was refused by the episode (bad input, episode already over); the episode itself lives on."""


class PoolFullError(RuntimeError):
    """Every worker already holds `max_episodes_per_worker` open episodes."""


class EnvStartupError(RuntimeError):
    """Environment workers could not be started: the pool refuses new episodes rather than train on the rest."""
