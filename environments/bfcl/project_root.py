"""Point bfcl-eval's BFCL_PROJECT_ROOT somewhere writable before its modules are imported.

bfcl-eval creates result/score/lock folders under PROJECT_ROOT at import time, and PROJECT_ROOT defaults to the
folder that holds site-packages. A caller's own setting always wins."""

from __future__ import annotations

import os
import sys
import tempfile

ENV_VAR = "BFCL_PROJECT_ROOT"


def ensure_bfcl_project_root() -> str:
    """Return the project root bfcl-eval will use, choosing a per-user temp folder if none is set."""
    root = os.environ.get(ENV_VAR)
    if not root:
        if "bfcl_eval.constants.eval_config" in sys.modules:
            # Too late to redirect it: bfcl-eval already fixed its paths.
            return str(sys.modules["bfcl_eval.constants.eval_config"].PROJECT_ROOT)
        root = os.path.join(tempfile.gettempdir(), f"t3rl_bfcl_project_root_{os.getuid()}")
        os.environ[ENV_VAR] = root
    os.makedirs(root, exist_ok=True)
    return root
