"""Many episodes stepped in worker processes, each pinned to the worker that holds its state: the pool's facade.

The API classes are pure Python, so parallelism needs processes. Three layers sit under `EnvPool`:
  transport   one worker process and its pipe (`transport.py`)
  supervisor  timeouts, restarts, recycling, start-up failures (`supervisor.py`)
  router      episode -> worker placement and the record of failed episodes (`router.py`)

Every operation returns a `concurrent.futures.Future` at once, so a driver can overlap environment steps with
decoding. A request that runs longer than `step_timeout_s`, or a worker that dies, gets that worker killed and
replaced; exactly the episodes it held fail (their futures raise `EpisodeFailed`; `finish()` gives an
`EpisodeResult` with failed=True, reward 0 and the reason), episodes on other workers go on untouched. Every way an
episode can end without its environment (worker lost, open refused, pool shut down) ends in such a failed result.
Workers that cannot start make `open()` raise `EnvStartupError` naming what failed and where, rather than let a run
train on the workers that remain; `wait_ready()` checks this up front. `num_workers=0` runs the same interface
in-process (no timeouts), for tests and tiny runs.

Results never depend on which worker ran an episode or in which order: each episode builds its own instances and
process-wide settings the classes touch are restored after every call (see `environments.bfcl.executor`).
"""

from __future__ import annotations

import itertools
import multiprocessing
import threading
from concurrent.futures import Future
from typing import Any

from environments.bfcl.pool.errors import EnvRequestError, EnvStartupError, EpisodeFailed, PoolFullError
from environments.bfcl.pool.router import Router
from environments.bfcl.pool.supervisor import MAX_STARTUP_FAILURES, WARMUP_TIMEOUT_S, Request, Supervisor, Worker

__all__ = ["EnvPool", "RemoteEpisode", "EpisodeFailed", "EnvRequestError", "PoolFullError", "EnvStartupError",
           "EpisodeStart", "TurnEnd", "MAX_STARTUP_FAILURES", "WARMUP_TIMEOUT_S"]

_LOCAL = "in-process"  # the router's name for the in-process table


def __getattr__(name: str):
    # Lazy: the reply shapes live with the worker, whose imports (bfcl-eval) the parent need not pay for up front.
    if name in ("EpisodeStart", "TurnEnd"):
        from environments.bfcl import worker

        return getattr(worker, name)
    raise AttributeError(f"module 'environments.bfcl.pool' has no attribute {name!r}")


def _completed(value: Any = None, error: BaseException | None = None) -> Future:
    future: Future = Future()
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
    return future


def _failed_result(entry_id: str, reason: str):
    from environments.bfcl import catalog
    from environments.bfcl.episode import EpisodeResult

    try:
        num_turns = catalog.load_entry(entry_id).num_turns
    except ValueError:  # the entry itself was the problem
        num_turns = 0
    return EpisodeResult(entry_id=entry_id, num_turns=num_turns, turn_correct=(), progress=0.0, binary=0.0,
                         format_score=0.0, reward=0.0, reward_kind="failed", failed=True, failure_reason=reason)


class EnvPool:
    """Episodes in `num_workers` processes (0: in-process). Use as a context manager or call `shutdown()`."""

    def __init__(self, num_workers: int = 2, *, step_timeout_s: float = 30.0, max_episodes_per_worker: int = 256,
                 recycle_after: int | None = 4096, start_method: str = "forkserver"):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if step_timeout_s <= 0:
            raise ValueError(f"step_timeout_s must be positive, got {step_timeout_s}")
        if max_episodes_per_worker < 1:
            raise ValueError(f"max_episodes_per_worker must be >= 1, got {max_episodes_per_worker}")
        if start_method not in ("forkserver", "spawn"):
            raise ValueError(f"start_method must be 'forkserver' or 'spawn' (never 'fork'), got {start_method!r}")
        self.num_workers = num_workers
        self.step_timeout_s = step_timeout_s
        self.max_episodes_per_worker = max_episodes_per_worker
        self._lock = threading.RLock()
        self._keys = itertools.count()
        self._router = Router(max_episodes_per_worker)
        self._closed = False
        self._local = None
        self._supervisor: Supervisor | None = None
        if num_workers == 0:
            from environments.bfcl.worker import EpisodeTable

            self._local = EpisodeTable()
        else:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context(start_method if start_method in methods else "spawn")
            self._supervisor = Supervisor(num_workers, context=context, lock=self._lock,
                                          step_timeout_s=step_timeout_s, recycle_after=recycle_after,
                                          on_lost=self._on_worker_lost)

    # ---- public API ----------------------------------------------------------------------------------------------
    def open(self, entry_id: str, *, augment: bool = False, reward_kind: str = "progress",
             prompt_style: str = "t3rl") -> "RemoteEpisode":
        """Start an episode; `RemoteEpisode.started` resolves to its `EpisodeStart` (tools, first messages)."""
        from environments.bfcl.prompts import check_style

        check_style(prompt_style)
        key = next(self._keys)
        args = (entry_id, augment, reward_kind, prompt_style)
        with self._lock:
            if self._closed:
                raise RuntimeError("the pool is shut down")
            if self._local is not None:
                if self._router.held_by(_LOCAL) >= self.max_episodes_per_worker:
                    raise PoolFullError(f"{self._router.held_by(_LOCAL)} episodes open in-process; finish some first")
                self._router.assign(key, entry_id, _LOCAL)
                started = self._run_local("open", key, args)
            else:
                supervisor = self._supervisor
                if supervisor.startup_error is not None:
                    raise EnvStartupError(supervisor.startup_error)
                alive = supervisor.alive_workers()
                if not alive:
                    raise EnvStartupError("no environment worker is running (all slots are restarting)")
                worker = self._router.pick(alive, supervisor.draining)
                self._router.assign(key, entry_id, worker)
                worker.served += 1
        if self._local is None:
            started = self._supervisor.submit(worker, "open", key, args, entry_id)
        started.add_done_callback(lambda future: self._on_started(key, entry_id, future))
        return RemoteEpisode(self, key, entry_id, started)

    def wait_ready(self, timeout_s: float = WARMUP_TIMEOUT_S) -> None:
        """Block until every worker has started and loaded the catalog; EnvStartupError if they cannot."""
        if self._supervisor is not None:
            self._supervisor.wait_ready(timeout_s)

    @property
    def open_episodes(self) -> int:
        with self._lock:
            return self._router.open_episodes

    @property
    def restarts(self) -> int:
        return self._supervisor.restarts if self._supervisor is not None else 0

    def worker_pids(self) -> list[int]:
        return self._supervisor.pids() if self._supervisor is not None else []

    def worker_pid_of(self, episode: "RemoteEpisode") -> int | None:
        """Process id of the worker holding `episode` (None in-process, or once it is finished or failed)."""
        with self._lock:
            worker = self._router.worker_of(episode.key)
            return worker.pid if isinstance(worker, Worker) else None

    def episodes_per_worker(self) -> list[int]:
        """Open episodes held by each worker slot, in slot order."""
        with self._lock:
            if self._supervisor is None:
                return [self._router.held_by(_LOCAL)]
            return [self._router.held_by(w) for w in self._supervisor.workers]

    def shutdown(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._supervisor is not None:
            self._supervisor.shutdown()
            return
        with self._lock:
            self._local.episodes.clear()
            self._router.fail_worker(_LOCAL, "pool shut down")

    def __enter__(self) -> "EnvPool":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- requests --------------------------------------------------------------------------------------------------
    def _request(self, key: int, op: str, args: tuple) -> Future:
        with self._lock:
            failure = self._router.failure(key)
            if failure is not None:
                entry_id, reason = failure
                if op == "finish":
                    self._router.forget_failure(key)
                    return _completed(_failed_result(entry_id, reason))
                return _completed(error=EpisodeFailed(key, reason))
            worker = self._router.worker_of(key)
            if worker is None:
                return _completed(error=EnvRequestError(f"episode {key} is not open"))
            entry_id = self._router.entry_of(key)
            if op == "finish":
                self._router.release(key)
                idle = self._router.held_by(worker) == 0
            if self._local is not None:
                future = self._run_local(op, key, args)
        if self._local is None:
            future = self._supervisor.submit(worker, op, key, args, entry_id)
            if op == "finish":
                self._supervisor.recycle_if_due(worker, idle)
        return self._finished(key, entry_id, future) if op == "finish" else future

    def _run_local(self, op: str, key: int, args: tuple) -> Future:
        try:
            return _completed(self._local.handle(op, key, args))
        except Exception as e:
            return _completed(error=EnvRequestError(f"{type(e).__name__}: {e}"))

    def _finished(self, key: int, entry_id: str, future: Future) -> Future:
        """finish() always yields an EpisodeResult: a lost worker or a refused finish gives a failed one."""
        outer: Future = Future()

        def done(inner: Future) -> None:
            try:
                outer.set_result(inner.result())
                return
            except EpisodeFailed as e:
                reason = e.reason
            except Exception as e:
                reason = f"finish failed: {type(e).__name__}: {e}"
            with self._lock:
                # An open that failed while this finish was on its way: its reason is the one that matters.
                earlier = self._router.forget_failure(key)
            outer.set_result(_failed_result(entry_id, earlier[1] if earlier else reason))

        future.add_done_callback(done)
        return outer

    def _on_started(self, key: int, entry_id: str, future: Future) -> None:
        error = future.exception()
        if error is not None and not isinstance(error, EpisodeFailed):
            # The episode never came to exist (unknown entry, bad reward kind): it still ends as a failed result.
            with self._lock:
                self._router.fail(key, entry_id, f"open failed: {error}")

    def _on_worker_lost(self, worker: Worker, reason: str, pending: list[Request]) -> None:
        with self._lock:
            self._router.fail_worker(worker, reason)
        for request in pending:
            if not request.future.done():
                request.future.set_exception(EpisodeFailed(request.key, reason))


class RemoteEpisode:
    """An episode living in a pool; mirrors `Episode`'s operations, each returning a Future."""

    def __init__(self, pool: EnvPool, key: int, entry_id: str, started: Future):
        self.pool, self.key, self.entry_id, self.started = pool, key, entry_id, started

    def _call(self, op: str, *args) -> Future:
        return self.pool._request(self.key, op, args)

    def step(self, calls: list) -> Future:
        """Future[list[str]]: one result per call."""
        return self._call("step", calls)

    def record_text_reply(self) -> Future:
        return self._call("text_reply")

    def record_format_error(self, reason: str) -> Future:
        """Future[str]: the feedback text for the model."""
        return self._call("format_error", reason)

    def end_turn(self, *, cut_off: bool = False) -> Future:
        """Future[TurnEnd]."""
        return self._call("end_turn", cut_off)

    def finish(self) -> Future:
        """Future[EpisodeResult]; releases the episode (a failed one yields a failed result, reward 0)."""
        return self._call("finish")
