"""The environment protocol the core depends on, and the one factory that builds a concrete pool.

The rollout driver, the trainer and evaluation talk to environments only through these shapes: a pool opens
episodes; an episode answers every operation with a `concurrent.futures.Future`; the answers are an
`EpisodeStart`, lists of result strings, feedback text, a `TurnEnd` and finally an `EpisodeResult`. Nothing here
imports JAX or `environments`; `make_env_pool` imports the BFCL pool when called.

What an episode shows the model depends on its prompt style (`prompt.style`, see `environments.bfcl.prompts`):
`EpisodeStart.first_messages` already holds the style's system prompt (none for "bfcl") and `tools` the style's
tool docs, which stay the same for the whole episode; at a miss_func reveal turn `TurnEnd.next_messages` already
carries the revealed docs in the style's form (`revealed_tools` lists them for metrics; nothing to re-render).
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class EpisodeStart(Protocol):
    entry_id: str
    num_turns: int
    first_messages: list[dict]

    @property
    def tools(self) -> list[dict]: ...


@runtime_checkable
class TurnEnd(Protocol):
    next_messages: list[dict] | None  # None: the episode is over
    revealed_tools: list[dict]
    turn_correct: tuple[bool, ...]


@runtime_checkable
class EpisodeResult(Protocol):
    """`failed` episodes (worker lost, open refused, pool shut down) have reward 0 and a `failure_reason`; they
    are to be left out of group statistics, not scored as the policy's fault."""

    entry_id: str
    reward: float
    turn_correct: tuple[bool, ...]
    progress: float
    binary: float
    format_score: float
    num_turns: int
    failed: bool
    failure_reason: str | None


@runtime_checkable
class RemoteEpisode(Protocol):
    entry_id: str
    started: Future  # Future[EpisodeStart]

    def step(self, calls: list[dict]) -> Future:
        """Future[list[str]]: one result per call, in order."""

    def record_text_reply(self) -> Future:
        """Future[None]: a reply without tool calls (call end_turn next)."""

    def record_format_error(self, reason: str) -> Future:
        """Future[str]: the feedback text for a reply whose calls could not be parsed."""

    def end_turn(self, *, cut_off: bool = False) -> Future:
        """Future[TurnEnd]."""

    def finish(self) -> Future:
        """Future[EpisodeResult]; always resolves to a result (a failed one when the environment failed)."""


@runtime_checkable
class EnvironmentPool(Protocol):
    def open(self, entry_id: str, *, augment: bool, reward_kind: str,
             prompt_style: str = "t3rl") -> RemoteEpisode: ...

    def wait_ready(self, timeout_s: float = ...) -> None:
        """Raise (naming what failed and where) if the environment workers cannot start."""

    def shutdown(self) -> None: ...

    @property
    def open_episodes(self) -> int: ...

    def __enter__(self) -> "EnvironmentPool": ...

    def __exit__(self, *exc: Any) -> None: ...


def make_env_pool(env_cfg, *, num_workers: int | None = None, wait_ready: bool = True) -> EnvironmentPool:
    """The BFCL pool for the `env` config section (`num_workers`, `step_timeout_s`). With `wait_ready`, returns
    only once every worker has started, so a broken installation stops a run before its first step."""
    from environments.bfcl.pool import EnvPool

    workers = int(env_cfg.num_workers if num_workers is None else num_workers)
    pool = EnvPool(workers, step_timeout_s=float(env_cfg.step_timeout_s))
    if wait_ready:
        try:
            pool.wait_ready()
        except BaseException:
            pool.shutdown()
            raise
    return pool


def local_episode(entry_id: str, *, prompt_style: str = "t3rl"):
    """One episode stepped in this process, without a worker (for counting a ground-truth replay's tokens; never
    for model text at training scale, which goes through the pool's isolation and timeouts)."""
    from environments.bfcl.episode import Episode

    return Episode(entry_id, prompt_style=prompt_style)

