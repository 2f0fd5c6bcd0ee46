"""Entry point of an environment worker process: import the worker loop inside a guard, then serve.

It lives outside `environments.bfcl` on purpose: importing that package already touches bfcl-eval's settings
(BFCL_PROJECT_ROOT), and a failure there must still reach the parent as a message that says what failed, not
only as a process that exited. Nothing here imports more than the standard library.
"""

from __future__ import annotations

import traceback

# First element of the one message a worker sends when it cannot start: (STARTUP_ERROR, summary, traceback).
STARTUP_ERROR = "startup_error"


def run_worker(conn) -> None:
    try:
        from environments.bfcl.worker import worker_main
    except BaseException as e:  # noqa: BLE001  (whatever stops the import is what the parent must hear about)
        try:
            conn.send((STARTUP_ERROR, f"{type(e).__name__}: {e}", traceback.format_exc()))
        finally:
            conn.close()
        return
    worker_main(conn)
