import os

# Mesh tests need several devices; set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("BFCL_PROJECT_ROOT", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".bfcl_root"))
os.makedirs(os.environ["BFCL_PROJECT_ROOT"], exist_ok=True)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One JAX compilation cache for the whole run, shared by the xdist workers (spawned after this module loads, they
# inherit the variable) and by every subprocess a test starts (they copy os.environ): the end-to-end tests run the
# tiny preset many times with the same shapes, and on two CPU cores a third to a half of such a run is XLA
# compiling the engine's prefill buckets and the train steps. A hit loads the executable a miss compiled, so
# results are the same.
# Fresh per run (a stale cache from another checkout never answers) and removed at the end; a cache size turns on
# jax's file lock, so concurrent writers and readers do not see half-written entries.
_CREATED_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and "PYTEST_XDIST_WORKER" not in os.environ:
    import tempfile

    _CREATED_CACHE = tempfile.mkdtemp(prefix="t3rl-jax-test-compile-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CREATED_CACHE
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))


def pytest_unconfigure(config):
    if _CREATED_CACHE:
        import shutil

        shutil.rmtree(_CREATED_CACHE, ignore_errors=True)
