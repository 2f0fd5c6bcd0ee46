"""The environment side as the core sees it: a protocol and one factory (`t3rl_jax.envs.base`)."""

from t3rl_jax.envs.base import (
    EnvironmentPool,
    EpisodeResult,
    EpisodeStart,
    RemoteEpisode,
    TurnEnd,
    make_env_pool,
)

__all__ = ["EnvironmentPool", "EpisodeResult", "EpisodeStart", "RemoteEpisode", "TurnEnd", "make_env_pool"]
