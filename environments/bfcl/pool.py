"""Many episodes stepped in worker processes, each episode pinned to the worker that holds its state.

The API classes are pure Python, so parallelism needs processes. Workers start with `forkserver` (or `spawn`),
never plain `fork`: the trainer process runs JAX/XLA threads that a fork would copy in a broken state.

Every operation returns a `concurrent.futures.Future` at once, so a driver can overlap environment steps with
decoding. A request that runs longer than `step_timeout_s`, or a worker that dies, gets the worker killed and
replaced; every episode it held is failed (reward 0, reason recorded) and its futures raise `EpisodeFailed`.
`num_workers=0` runs the same interface in-process (no timeouts), for tests and tiny runs.
"""

from __future__ import annotations

import itertools
import multiprocessing
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from environments.bfcl.episode import EpisodeResult
from environments.bfcl.worker import EpisodeStart, EpisodeTable, TurnEnd, worker_main

__all__ = ["EnvPool", "RemoteEpisode", "EpisodeFailed", "EnvRequestError", "PoolFullError", "EpisodeStart",
           "TurnEnd"]


WARMUP_TIMEOUT_S = 300.0
MAX_STARTUP_FAILURES = 3


class EpisodeFailed(RuntimeError):
    """The episode's worker crashed or timed out; the episode is scored as failed."""

    def __init__(self, key: int, reason: str):
        super().__init__(f"episode {key} failed: {reason}")
        self.key, self.reason = key, reason


class EnvRequestError(RuntimeError):
    """A request was refused by the episode (bad input, episode already over); the episode itself lives on."""


class PoolFullError(RuntimeError):
    """Every worker already holds `max_episodes_per_worker` open episodes."""


def _completed(value: Any = None, error: BaseException | None = None) -> Future:
    future: Future = Future()
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
    return future


@dataclass
class _Request:
    future: Future
    key: int
    op: str
    entry_id: str = ""
    timeout_s: float = 0.0


class _Worker:
    def __init__(self, context, slot: int, generation: int, on_reply, on_lost):
        self.slot, self.generation = slot, generation
        parent_conn, child_conn = context.Pipe(duplex=True)
        self.process = context.Process(target=worker_main, args=(child_conn,), daemon=True,
                                       name=f"bfcl-env-{slot}.{generation}")
        self.process.start()
        child_conn.close()
        self.conn = parent_conn
        self.send_lock = threading.Lock()
        self.pending: OrderedDict[int, _Request] = OrderedDict()
        self.head_started_at = 0.0  # when the oldest pending request began to run
        self.episodes: set[int] = set()
        self.served = 0
        self.alive = True
        self.replied = False  # a worker that dies before its first reply is failing at start-up
        self._reader = threading.Thread(target=self._read, args=(on_reply, on_lost), daemon=True,
                                        name=f"bfcl-env-reader-{slot}.{generation}")
        self._reader.start()

    def _read(self, on_reply, on_lost) -> None:
        # Only this thread closes the connection: closing it under a blocked recv would let that recv go on
        # reading a reused file descriptor (another worker's pipe).
        try:
            while True:
                try:
                    replies = self.conn.recv()
                except (EOFError, OSError):
                    self.process.join(timeout=1)
                    on_lost(self, f"worker process exited (exit code {self.process.exitcode})")
                    return
                except Exception as e:  # an unreadable reply leaves the stream in an unknown state
                    on_lost(self, f"unreadable reply from worker: {type(e).__name__}: {e}")
                    return
                on_reply(self, replies)
        finally:
            with self.send_lock:  # no sender may hold the descriptor number while it is released
                self.conn.close()

    def kill(self) -> None:
        """Stop the process; the reader thread then sees end-of-file and closes the connection."""
        self.alive = False
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)


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
        self.recycle_after = recycle_after
        self.restarts = 0
        self._keys = itertools.count()
        self._request_ids = itertools.count()
        self._lock = threading.RLock()
        self._failed: dict[int, tuple[str, str]] = {}  # key -> (entry_id, reason)
        self._entry_of: dict[int, str] = {}
        self._closed = False
        self._startup_failures = 0
        self._startup_error = ""
        self._local = EpisodeTable() if num_workers == 0 else None
        self._workers: list[_Worker] = []
        self._generations = itertools.count()
        if num_workers:
            methods = multiprocessing.get_all_start_methods()
            self._context = multiprocessing.get_context(start_method if start_method in methods else "spawn")
            self._workers = [self._start_worker(slot) for slot in range(num_workers)]
            for worker in self._workers:
                self._send(worker, "warmup", -1, ())  # loads the catalog while the caller does other work
            self._stop = threading.Event()
            self._monitor = threading.Thread(target=self._watch_timeouts, daemon=True, name="bfcl-env-monitor")
            self._monitor.start()

    # ---- public API ----------------------------------------------------------------------------------------------
    def open(self, entry_id: str, *, augment: bool = False, reward_kind: str = "progress") -> "RemoteEpisode":
        """Start an episode; `RemoteEpisode.started` resolves to its `EpisodeStart` (tools, first messages)."""
        key = next(self._keys)
        args = (entry_id, augment, reward_kind)
        with self._lock:
            if self._closed:
                raise RuntimeError("the pool is shut down")
            if self._local is not None:
                if len(self._local.episodes) >= self.max_episodes_per_worker:
                    raise PoolFullError(f"{len(self._local.episodes)} episodes open in-process; finish some first")
                return RemoteEpisode(self, key, entry_id, self._run_local("open", key, args))
            worker = self._pick_worker()
            worker.episodes.add(key)
            worker.served += 1
            self._entry_of[key] = entry_id
        # Never send while holding the pool lock: a full pipe would block the reader that drains the worker.
        return RemoteEpisode(self, key, entry_id, self._send(worker, "open", key, args), worker)

    @property
    def open_episodes(self) -> int:
        with self._lock:
            if self._local is not None:
                return len(self._local.episodes)
            return sum(len(w.episodes) for w in self._workers)

    def worker_pids(self) -> list[int]:
        with self._lock:
            return [w.process.pid for w in self._workers]

    def shutdown(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            workers = list(self._workers)
        if self._local is not None:
            self._local.episodes.clear()
            return
        self._stop.set()
        for worker in workers:
            try:
                with worker.send_lock:
                    worker.conn.send((-1, "shutdown", -1, ()))
            except (OSError, ValueError):
                pass
        for worker in workers:
            worker.process.join(timeout=2)
            self._lose(worker, "pool shut down", kill=True)

    def __enter__(self) -> "EnvPool":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- requests --------------------------------------------------------------------------------------------------
    def _request(self, key: int, op: str, args: tuple, worker: _Worker | None) -> Future:
        with self._lock:
            if key in self._failed:
                if op == "finish":
                    return _completed(self._failed_result(key, release=True))
                return _completed(error=EpisodeFailed(key, self._failed[key][1]))
            if self._local is not None:
                return self._run_local(op, key, args)
            if worker is None or key not in worker.episodes or not worker.alive:
                return _completed(error=EnvRequestError(f"episode {key} is not open"))
            entry_id = self._entry_of.get(key, "")
            if op == "finish":
                worker.episodes.discard(key)
                self._entry_of.pop(key, None)
        future = self._send(worker, op, key, args, entry_id)
        if op == "finish":
            self._maybe_recycle(worker)
        return future

    def _run_local(self, op: str, key: int, args: tuple) -> Future:
        try:
            return _completed(self._local.handle(op, key, args))
        except Exception as e:
            return _completed(error=EnvRequestError(f"{type(e).__name__}: {e}"))

    def _send(self, worker: _Worker, op: str, key: int, args: tuple, entry_id: str = "") -> Future:
        future: Future = Future()
        request_id = next(self._request_ids)
        with self._lock:
            if not worker.pending:
                worker.head_started_at = time.monotonic()
            # Loading the catalog (warmup) is not a step: it gets its own, generous limit.
            timeout_s = WARMUP_TIMEOUT_S if op == "warmup" else self.step_timeout_s
            worker.pending[request_id] = _Request(future, key, op, entry_id, timeout_s)
        try:
            with worker.send_lock:
                worker.conn.send((request_id, op, key, args))
        except Exception as e:
            with self._lock:
                worker.pending.pop(request_id, None)
            if isinstance(e, (OSError, ValueError, EOFError)):
                # A broken pipe can win the race with the reader thread noticing the exit: same cause, one message.
                reason = f"worker process exited (could not reach it: {e})"
                self._lose(worker, reason)
                future.set_exception(EpisodeFailed(key, reason))
            else:  # e.g. arguments that cannot be pickled: the request is refused, the episode lives on
                future.set_exception(EnvRequestError(f"request {op!r} could not be sent: {type(e).__name__}: {e}"))
        return future

    def _on_reply(self, worker: _Worker, replies: list) -> None:
        with self._lock:
            answered = [(worker.pending.pop(request_id, None), ok, value) for request_id, ok, value in replies]
            worker.head_started_at = time.monotonic()
            worker.replied = True
        for request, ok, value in answered:
            if request is None:
                continue
            if ok:
                request.future.set_result(value)
            else:
                request.future.set_exception(EnvRequestError(value))

    # ---- failures -------------------------------------------------------------------------------------------------
    def _watch_timeouts(self) -> None:
        interval = min(0.05, self.step_timeout_s / 4)
        while not self._stop.wait(interval):
            now = time.monotonic()
            late = []
            with self._lock:
                for worker in self._workers:
                    head = next(iter(worker.pending.values()), None) if worker.alive else None
                    if head is not None and now - worker.head_started_at > head.timeout_s:
                        late.append((worker, head))
            for worker, head in late:
                self._lose(worker, f"{head.op} of episode {head.key} exceeded {head.timeout_s:g}s; worker killed",
                           kill=True)

    def _on_lost(self, worker: _Worker, reason: str) -> None:
        self._lose(worker, reason)

    def _lose(self, worker: _Worker, reason: str, kill: bool = False) -> None:
        """Fail everything `worker` held and put a fresh worker in its slot (unless the pool is closing)."""
        with self._lock:
            if not worker.alive and not kill:
                return
            was_alive = worker.alive
            worker.alive = False
            pending = list(worker.pending.values())
            worker.pending.clear()
            episodes = set(worker.episodes)
            worker.episodes.clear()
            for key in episodes:
                self._failed[key] = (self._entry_of.pop(key, ""), reason)
            replace = was_alive and not self._closed and self._workers[worker.slot] is worker
            if replace and not worker.replied:
                # Do not respawn forever when workers cannot even start (e.g. an import fails in them).
                self._startup_failures += 1
                replace = self._startup_failures <= MAX_STARTUP_FAILURES
                self._startup_error = reason
            if replace:
                self.restarts += 1
                self._workers[worker.slot] = self._start_worker(worker.slot)
        if kill or replace:
            worker.kill()
        for request in pending:
            if request.op == "finish":
                with self._lock:
                    self._failed[request.key] = (request.entry_id, reason)
                request.future.set_result(self._failed_result(request.key, release=True))
            else:
                request.future.set_exception(EpisodeFailed(request.key, reason))

    def _failed_result(self, key: int, release: bool = False) -> EpisodeResult:
        from environments.bfcl import catalog

        with self._lock:
            entry_id, reason = self._failed.pop(key) if release else self._failed[key]
        return EpisodeResult(entry_id=entry_id, num_turns=catalog.load_entry(entry_id).num_turns, turn_correct=(),
                             progress=0.0, binary=0.0, format_score=0.0, reward=0.0, reward_kind="failed",
                             failed=True, failure_reason=reason)

    # ---- worker management -------------------------------------------------------------------------------------------
    def _start_worker(self, slot: int) -> _Worker:
        return _Worker(self._context, slot, next(self._generations), self._on_reply, self._on_lost)

    def _draining(self, worker: _Worker) -> bool:
        return self.recycle_after is not None and worker.served >= self.recycle_after

    def _pick_worker(self) -> _Worker:
        alive = [w for w in self._workers if w.alive]
        if not alive:
            raise RuntimeError(f"no worker process could be started: {self._startup_error}")
        candidates = [w for w in alive if len(w.episodes) < self.max_episodes_per_worker]
        if not candidates:
            raise PoolFullError(f"all {len(self._workers)} workers hold {self.max_episodes_per_worker} open "
                                "episodes; finish some first")
        fresh = [w for w in candidates if not self._draining(w)] or candidates
        return min(fresh, key=lambda w: len(w.episodes))

    def _maybe_recycle(self, worker: _Worker) -> None:
        # A worker that has served many episodes is restarted once idle, bounding whatever it accumulated.
        with self._lock:
            if (not self._draining(worker) or worker.episodes or self._closed or not worker.alive
                    or self._workers[worker.slot] is not worker):
                return
            self._workers[worker.slot] = self._start_worker(worker.slot)
            self.restarts += 1
            old = worker

            def retire():
                deadline = time.monotonic() + self.step_timeout_s
                while old.pending and time.monotonic() < deadline:
                    time.sleep(0.01)
                try:
                    with old.send_lock:
                        old.conn.send((-1, "shutdown", -1, ()))
                except (OSError, ValueError):
                    pass
                old.process.join(timeout=2)
                self._lose(old, "worker retired", kill=True)

            threading.Thread(target=retire, daemon=True, name="bfcl-env-retire").start()


class RemoteEpisode:
    """An episode living in a pool; mirrors `Episode`'s operations, each returning a Future."""

    def __init__(self, pool: EnvPool, key: int, entry_id: str, started: Future, worker: _Worker | None = None):
        self.pool, self.key, self.entry_id, self.started = pool, key, entry_id, started
        self._worker = worker

    def _call(self, op: str, *args) -> Future:
        return self.pool._request(self.key, op, args, self._worker)

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
