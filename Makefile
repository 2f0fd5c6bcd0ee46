# Every target bootstraps .venv on a fresh machine; re-running is a no-op once installed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# bfcl-eval's loader writes folders into site-packages unless this is set.
export BFCL_PROJECT_ROOT ?= $(CURDIR)/.bfcl_root
NO_DEPS_PKGS := bfcl-eval==2026.3.23 google-jetstream==0.2.2 trl==1.16.0  # trl: only its Qwen3-Instruct-2507 chat template file (exports)
# Compile-only accelerator targets (t3rl_jax/accel): the CUDA 13 plugin + cuDNN for H200 and libtpu for TPU
# slices, without the CUDA runtime wheels a real GPU needs (those come with `pip install -e ".[cuda13]"`).
ACCEL_PKGS := jax-cuda13-plugin==0.10.2 jax-cuda13-pjrt==0.10.2 nvidia-cudnn-cu13==9.28.1.4 libtpu==0.0.42.1
# The CUDA plugin dies in its driver check unless the CPU is the platform (no GPU here); the TPU plugin
# then stays compile-only too.
export JAX_PLATFORMS ?= cpu
export TPU_SKIP_MDS_QUERY ?= 1
# Compile-only libtpu in several processes (pytest -n 2, parallel fit checks): skip its one-process lockfile.
export ALLOW_MULTIPLE_LIBTPU_LOAD ?= 1

# glibc malloc: keep freed blocks under 1 GiB in the heap instead of unmapping them (XLA CPU reallocates its big
# buffers every step; the demo spent 207 of its 937 CPU seconds in page faults). tests/conftest.py sets the same.
export GLIBC_TUNABLES ?= glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296:glibc.malloc.hugetlb=1

.PHONY: venv demo test test-fast bench fit-check clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps $(NO_DEPS_PKGS)
	$(BIN)/pip install -q --no-deps $(ACCEL_PKGS)
	mkdir -p $(BFCL_PROJECT_ROOT)
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/python -m t3rl_jax.main --config=demo

# 8 fake CPU devices so mesh / context-parallel tests run on one CPU.
test: venv
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -q -rx -n 2 --dist=loadfile --durations=40 tests

test-fast: venv
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -q -m "not slow" tests

# Every jitted function of each 8xH200 preset compiled for 8 H200s (no GPU needed): per-function memory and the
# colocated peak per device; fails when a preset passes its limit. Minutes per preset on 2 cores.
FIT_PRESETS ?= stage1 stage2 paper_stage3
fit-check: venv
	for c in $(FIT_PRESETS); do echo "== $$c"; $(BIN)/python scripts/fit_check.py --config=$$c --target=h200 || exit 1; done

bench: venv
	for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .bfcl_root
