"""Which worker holds which episode: placement of new episodes, and what became of episodes whose worker was lost.

An episode's state lives in one worker process, so every request of an episode goes to the worker that opened it.
Not thread-safe on its own: the pool calls it under its lock.
"""

from __future__ import annotations

from typing import Callable, Hashable, Sequence

from environments.bfcl.pool.errors import PoolFullError


class Router:
    def __init__(self, max_episodes_per_worker: int):
        self.max_episodes_per_worker = max_episodes_per_worker
        self._held: dict[Hashable, set[int]] = {}  # worker -> keys of its open episodes
        self._worker_of: dict[int, Hashable] = {}
        self._entry_of: dict[int, str] = {}
        self._failed: dict[int, tuple[str, str]] = {}  # key -> (entry_id, reason), until the episode is finished

    def pick(self, workers: Sequence[Hashable], draining: Callable[[Hashable], bool]) -> Hashable:
        """The least loaded worker with room, preferring workers not due for recycling."""
        candidates = [w for w in workers if len(self._held.get(w, ())) < self.max_episodes_per_worker]
        if not candidates:
            raise PoolFullError(f"all {len(workers)} workers hold {self.max_episodes_per_worker} open episodes; "
                                "finish some first")
        fresh = [w for w in candidates if not draining(w)] or candidates
        return min(fresh, key=lambda w: len(self._held.get(w, ())))

    def assign(self, key: int, entry_id: str, worker: Hashable) -> None:
        self._held.setdefault(worker, set()).add(key)
        self._worker_of[key] = worker
        self._entry_of[key] = entry_id

    def worker_of(self, key: int) -> Hashable | None:
        return self._worker_of.get(key)

    def entry_of(self, key: int) -> str:
        return self._entry_of.get(key, "")

    def held_by(self, worker: Hashable) -> int:
        return len(self._held.get(worker, ()))

    @property
    def open_episodes(self) -> int:
        return len(self._worker_of)

    def release(self, key: int) -> None:
        """The episode was finished (or failed): it no longer occupies its worker."""
        worker = self._worker_of.pop(key, None)
        if worker is not None:
            self._held.get(worker, set()).discard(key)
        self._entry_of.pop(key, None)

    def fail(self, key: int, entry_id: str, reason: str) -> None:
        self._failed.setdefault(key, (entry_id, reason))
        self.release(key)

    def fail_worker(self, worker: Hashable, reason: str) -> list[int]:
        """Every episode `worker` held fails with `reason` (their state died with it); returns their keys."""
        keys = sorted(self._held.pop(worker, set()))
        for key in keys:
            self.fail(key, self._entry_of.get(key, ""), reason)
        return keys

    def failure(self, key: int) -> tuple[str, str] | None:
        return self._failed.get(key)

    def forget_failure(self, key: int) -> tuple[str, str] | None:
        return self._failed.pop(key, None)
