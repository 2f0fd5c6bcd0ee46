"""Keeping worker processes healthy: request bookkeeping, timeouts, restarts, recycling and start-up failures.

Each slot holds one live worker. A request that runs longer than its limit, or a worker that dies, gets the worker
killed and replaced in its slot; `on_lost(worker, reason, pending)` then tells the pool which requests will never
be answered (the pool decides what that means for episodes). Workers that die before their first reply are failing
at start-up: after `MAX_STARTUP_FAILURES` of them no more are started, and `startup_error` says what failed,
where, and the worker's own traceback when it could send one.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from environments.bfcl.pool.errors import EnvRequestError, EnvStartupError, EpisodeFailed
from environments.bfcl.pool.transport import WorkerProcess

WARMUP_TIMEOUT_S = 300.0
MAX_STARTUP_FAILURES = 3


@dataclass
class Request:
    future: Future
    key: int
    op: str
    entry_id: str = ""
    timeout_s: float = 0.0


@dataclass(eq=False)  # identity: the router keys episodes by worker object
class Worker:
    """A slot's current process and what it owes."""

    process: WorkerProcess | None
    slot: int
    generation: int
    pending: "OrderedDict[int, Request]" = field(default_factory=OrderedDict)
    head_started_at: float = 0.0  # when the oldest pending request began to run
    served: int = 0  # episodes opened on it
    alive: bool = True
    replied: bool = False  # a worker lost before its first reply is failing at start-up
    killed_by_supervisor: bool = False
    lost_reason: str = ""

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


class Supervisor:
    def __init__(self, num_workers: int, *, context, lock: threading.RLock, step_timeout_s: float,
                 recycle_after: int | None, on_lost: Callable[[Worker, str, list[Request]], None],
                 name: str = "bfcl-env"):
        self._context = context
        self._lock = lock
        self.step_timeout_s = step_timeout_s
        self.recycle_after = recycle_after
        self._on_lost_callback = on_lost
        self._name = name
        self._request_ids = itertools.count()
        self._generations = itertools.count()
        self.restarts = 0
        self.startup_failures = 0  # over the pool's life: a run's pool restarts workers rarely
        self.startup_error: str | None = None
        self._startup_trace = ""  # the latest traceback a failing worker sent
        self.closed = False
        self.workers: list[Worker] = []
        with self._lock:
            self.workers = [self._start(slot) for slot in range(num_workers)]
        for worker in list(self.workers):
            # Loads the catalog while the caller does other work; a failure here is a start-up failure.
            self.submit(worker, "warmup", -1, ())
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._watch_timeouts, daemon=True, name=f"{name}-monitor")
        self._monitor.start()

    # ---- requests ----------------------------------------------------------------------------------------------
    def submit(self, worker: Worker, op: str, key: int, args: tuple, entry_id: str = "") -> Future:
        future: Future = Future()
        request_id = next(self._request_ids)
        with self._lock:
            if not worker.alive:
                future.set_exception(EpisodeFailed(key, worker.lost_reason or "worker process is gone"))
                return future
            if not worker.pending:
                worker.head_started_at = time.monotonic()
            # Loading the catalog (warmup) is not a step: it gets its own, generous limit.
            timeout_s = WARMUP_TIMEOUT_S if op == "warmup" else self.step_timeout_s
            worker.pending[request_id] = Request(future, key, op, entry_id, timeout_s)
        # Never send while holding the lock: a full pipe would block the reader that drains the worker.
        try:
            worker.process.send((request_id, op, key, args))
        except Exception as e:
            with self._lock:
                worker.pending.pop(request_id, None)
            if isinstance(e, (OSError, ValueError, EOFError)):
                # A broken pipe can win the race with the reader thread noticing the exit: same cause, one message.
                reason = f"worker process exited (could not reach it: {e})"
                self.lose(worker, reason)
                future.set_exception(EpisodeFailed(key, reason))
            else:  # e.g. arguments that cannot be pickled: the request is refused, the episode lives on
                future.set_exception(EnvRequestError(f"request {op!r} could not be sent: {type(e).__name__}: {e}"))
        return future

    def _on_replies(self, worker: Worker, replies: list) -> None:
        with self._lock:
            answered = [(worker.pending.pop(request_id, None), ok, value) for request_id, ok, value in replies]
            worker.head_started_at = time.monotonic()
            worker.replied = True
        for request, ok, value in answered:
            if request is None:
                continue
            if request.op == "warmup" and not ok:
                # The worker runs but cannot load what every episode needs (e.g. the BFCL data): it cannot serve.
                with self._lock:
                    worker.replied = False
                self.lose(worker, f"warmup failed: {value}", kill=True, count_as_startup=True)
                request.future.set_exception(EnvStartupError(value))
            elif ok:
                request.future.set_result(value)
            else:
                request.future.set_exception(EnvRequestError(value))

    # ---- failures ----------------------------------------------------------------------------------------------
    def _watch_timeouts(self) -> None:
        interval = min(0.05, self.step_timeout_s / 4)
        while not self._stop.wait(interval):
            now = time.monotonic()
            late = []
            with self._lock:
                for worker in self.workers:
                    head = next(iter(worker.pending.values()), None) if worker.alive else None
                    if head is not None and now - worker.head_started_at > head.timeout_s:
                        late.append((worker, head))
            for worker, head in late:
                worker.killed_by_supervisor = True
                what = "warmup" if head.op == "warmup" else f"{head.op} of episode {head.key}"
                self.lose(worker, f"{what} exceeded {head.timeout_s:g}s; worker killed", kill=True,
                          count_as_startup=head.op == "warmup")

    def _on_process_lost(self, worker: Worker, reason: str, startup: tuple[str, str] | None) -> None:
        self.lose(worker, reason, trace=startup[1] if startup else "")

    def lose(self, worker: Worker, reason: str, *, kill: bool = False, count_as_startup: bool = False,
             trace: str = "") -> None:
        """Fail everything `worker` owed and put a fresh worker in its slot (unless the pool is closing or
        workers keep failing at start-up)."""
        with self._lock:
            if not worker.alive and not kill:
                return
            if self.closed:  # a worker told to stop may exit before shutdown() gets to it: one reason for all
                reason = "pool shut down"
            was_alive = worker.alive
            worker.alive = False
            worker.lost_reason = worker.lost_reason or reason
            new = None
            pending = list(worker.pending.values())
            worker.pending.clear()
            replace = was_alive and not self.closed and self.workers[worker.slot] is worker
            startup = count_as_startup or (not worker.replied and not worker.killed_by_supervisor)
            if was_alive and startup and not self.closed:
                self.startup_failures += 1
                self._startup_trace = trace or self._startup_trace
                if self.startup_failures >= MAX_STARTUP_FAILURES and self.startup_error is None:
                    self.startup_error = self._startup_message(worker, reason, self._startup_trace)
                replace = replace and self.startup_error is None
            if replace:
                self.restarts += 1
                new = self.workers[worker.slot] = self._start(worker.slot)
        if kill or replace:
            worker.process.kill()
        if new is not None:
            self.submit(new, "warmup", -1, ())
        if was_alive or pending:
            self._on_lost_callback(worker, reason, pending)

    def _startup_message(self, worker: Worker, reason: str, trace: str) -> str:
        where = (f"{self._name} worker in slot {worker.slot} (process {worker.process.name}, pid {worker.pid}, "
                 f"exit code {worker.process.exitcode})")
        text = (f"{self.startup_failures} environment worker(s) failed before answering their first request; the "
                f"last one, {where}: {reason}")
        if trace:
            text += f"\nworker traceback:\n{trace.rstrip()}"
        return text

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    def _start(self, slot: int) -> Worker:
        generation = next(self._generations)
        worker = Worker(None, slot, generation)
        worker.process = WorkerProcess(
            self._context, f"{self._name}-{slot}.{generation}",
            on_replies=lambda replies: self._on_replies(worker, replies),
            on_lost=lambda reason, startup: self._on_process_lost(worker, reason, startup),
        )
        return worker

    def alive_workers(self) -> list[Worker]:
        return [w for w in self.workers if w.alive]

    def draining(self, worker: Worker) -> bool:
        return self.recycle_after is not None and worker.served >= self.recycle_after

    def recycle_if_due(self, worker: Worker, idle: bool) -> None:
        """A worker that has served many episodes is restarted once idle, bounding whatever it accumulated."""
        with self._lock:
            if (not idle or not self.draining(worker) or self.closed or not worker.alive
                    or self.workers[worker.slot] is not worker):
                return
            self.workers[worker.slot] = self._start(worker.slot)
            self.restarts += 1
        new = self.workers[worker.slot]
        self.submit(new, "warmup", -1, ())

        def retire():
            deadline = time.monotonic() + self.step_timeout_s
            while worker.pending and time.monotonic() < deadline:
                time.sleep(0.01)
            worker.process.ask_to_stop()
            worker.process.join(timeout=2)
            worker.killed_by_supervisor = True
            self.lose(worker, "worker retired", kill=True)

        threading.Thread(target=retire, daemon=True, name=f"{self._name}-retire").start()

    def wait_ready(self, timeout_s: float = WARMUP_TIMEOUT_S) -> None:
        """Block until every slot's worker has answered; raise EnvStartupError if workers cannot start."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                if self.startup_error is not None:
                    raise EnvStartupError(self.startup_error)
                if all(w.alive and w.replied for w in self.workers):
                    return
            if time.monotonic() > deadline:
                with self._lock:
                    waiting = [f"slot {w.slot} (pid {w.pid})" for w in self.workers if not w.replied]
                raise EnvStartupError(f"environment workers {waiting} did not answer within {timeout_s:g}s")
            time.sleep(0.02)

    def shutdown(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            workers = list(self.workers)
        self._stop.set()
        for worker in workers:
            worker.process.ask_to_stop()
        for worker in workers:
            worker.process.join(timeout=2)
            worker.killed_by_supervisor = True
            self.lose(worker, "pool shut down", kill=True)

    def pids(self) -> list[int | None]:
        with self._lock:
            return [w.pid for w in self.workers]
