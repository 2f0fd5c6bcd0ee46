import os

import pytest

# Mesh tests need several devices; set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("BFCL_PROJECT_ROOT", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".bfcl_root"))
os.makedirs(os.environ["BFCL_PROJECT_ROOT"], exist_ok=True)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# glibc's malloc hands every freed block over its mmap threshold (dynamic, at most 32 MiB) back to the kernel, and
# XLA CPU frees and reallocates its buffers every step (the tiny model's [rows, 151,936] logit chunks): the demo took
# 84 million page faults and 207 s of system time in 8:45. A 1 GiB threshold and 4 GiB trim threshold keep those
# blocks in the heap, and hugetlb=1 backs it with transparent huge pages (0.6 million faults, 113 s, 7:17, the same
# metrics: BENCHMARKS.md, "Test-suite time", fourteenth session);
# the variable has to exist when a process starts, so it is set here for the xdist workers and every subprocess a
# test starts, and in the Makefile for `make demo` / `make test`.
os.environ.setdefault("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1073741824:"
                      "glibc.malloc.trim_threshold=4294967296:glibc.malloc.hugetlb=1")

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


# In-process tests compile dozens of small programs and run each once or twice, so on two cores most of their time
# is XLA's LLVM back end: jax's `jax_disable_most_optimizations` (backend optimization level 0; the HLO passes -
# fusion, SPMD partitioning, buffer assignment - still run) cut test_learner from 212 to 120 s of CPU. It is set for
# in-process tests only: the subprocess runs (test_resume, test_multihost, ...) execute for minutes and keep the
# production compiler, and so do the modules below, whose claims are about optimized programs.
KEEP_OPTIMIZED = {
    "test_accel_targets", "test_attention_backends", "test_fit_check", "test_gpu_check", "test_hlo_facts",
    "test_determinism",  # bit-for-bit determinism is a claim about the programs production runs
    # Execution-bound (4k-token prefills, whole episodes): slower unoptimized, measured in the full suite
    # (test_slot_classes' fixture 160 -> 362 s, test_driver's replay 46 -> 102 s, test_sft's warm start ~200 -> 249 s).
    "test_driver", "test_scheduler", "test_serve", "test_sft", "test_slot_classes",
}


@pytest.fixture(autouse=True, scope="module")  # module scope: set before a module's own fixtures compile
def _xla_backend_optimizations(request):
    import jax

    jax.config.update("jax_disable_most_optimizations", request.module.__name__.split(".")[-1] not in KEEP_OPTIMIZED)
    yield
    jax.config.update("jax_disable_most_optimizations", False)
