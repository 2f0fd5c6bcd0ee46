"""One worker process and its pipe: start it, send it messages, hand its replies to a callback, stop or kill it.

Knows nothing of episodes, timeouts or restarts (the supervisor's job). Workers start with `forkserver` (or
`spawn`), never plain `fork`: the trainer process runs JAX/XLA threads that a fork would copy in a broken state.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from environments.worker_entry import STARTUP_ERROR, run_worker

SHUTDOWN = (-1, "shutdown", -1, ())


class WorkerProcess:
    """A worker process; `on_replies(replies)` and `on_lost(reason, startup_error)` run on its reader thread.
    `startup_error` is the worker's own account (summary, traceback) when it could not start, else None."""

    def __init__(self, context, name: str, on_replies: Callable[[list], None],
                 on_lost: Callable[[str, tuple[str, str] | None], None]):
        self.name = name
        parent_conn, child_conn = context.Pipe(duplex=True)
        self.process = context.Process(target=run_worker, args=(child_conn,), daemon=True, name=name)
        self.process.start()
        child_conn.close()
        self._conn = parent_conn
        self._send_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, args=(on_replies, on_lost), daemon=True,
                                        name=f"{name}-reader")
        self._reader.start()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def exitcode(self) -> int | None:
        return self.process.exitcode

    def send(self, message: Any) -> None:
        """Raises OSError/ValueError/EOFError when the pipe is gone, and pickling errors for bad messages."""
        with self._send_lock:
            self._conn.send(message)

    def ask_to_stop(self) -> None:
        try:
            self.send(SHUTDOWN)
        except Exception:  # already gone
            pass

    def join(self, timeout: float) -> None:
        self.process.join(timeout=timeout)

    def kill(self) -> None:
        """Stop the process; the reader thread then sees end-of-file and closes the connection."""
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)

    def _read(self, on_replies, on_lost) -> None:
        # Only this thread closes the connection: closing it under a blocked recv would let that recv go on
        # reading a reused file descriptor (another worker's pipe).
        try:
            while True:
                try:
                    message = self._conn.recv()
                except (EOFError, OSError):
                    self.process.join(timeout=1)
                    on_lost(f"worker process exited (exit code {self.process.exitcode})", None)
                    return
                except Exception as e:  # an unreadable reply leaves the stream in an unknown state
                    on_lost(f"unreadable reply from worker: {type(e).__name__}: {e}", None)
                    return
                if isinstance(message, tuple) and message and message[0] == STARTUP_ERROR:
                    _, summary, trace = message
                    self.process.join(timeout=5)
                    on_lost(f"worker could not start: {summary}", (summary, trace))
                    return
                on_replies(message)
        finally:
            with self._send_lock:  # no sender may hold the descriptor number while it is released
                self._conn.close()
