"""Compile-only accelerator devices on a machine without the accelerator: H100/H200 through the CUDA 13 PJRT
plugin, TPU slices through libtpu. Meshes built from these devices let `jax.jit(...).lower(...).compile()` run the
real GPU or TPU compiler on abstract inputs, so memory per device and the optimized HLO can be read on a CPU box.

Both plugins must be loaded with `JAX_PLATFORMS=cpu` set before jax is imported (`prepare_environment()` does it
when called first): the CUDA plugin's start-up version check otherwise fails without a driver and it never
registers its topology factory; the default backend stays the CPU either way.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import pathlib

SPEC_DIR = pathlib.Path(__file__).parent / "gpu_specs"
# Fields newer than the GpuTargetConfigProto of jaxlib 0.10.x; a spec taken from a newer XLA may carry them.
_UNKNOWN_SPEC_FIELDS = ("collective_memory_granularity",)


class TargetError(RuntimeError):
    """The target cannot be compiled for here; the message says what is missing and how to install it."""


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str          # "cuda" or "tpu"
    devices_per_slice: int
    hbm_bytes: int         # memory per device that a run may plan with (the card's, not what JAX preallocates)
    gpu_spec: str = ""     # file in SPEC_DIR (cuda)
    topology: str = ""     # libtpu topology name (tpu)
    tpu_kwargs: tuple = ()


_NO_WRAP = (False, False, False)
TARGETS = {
    # 141 GB of HBM3e per H200 (XLA's spec says 151,397,597,184 bytes of device memory).
    "h200": Target("h200", "cuda", 8, 141 * 10**9, gpu_spec="h200.txtpb"),
    "h100": Target("h100", "cuda", 8, 80 * 10**9, gpu_spec="h100_sxm.txtpb"),
    # libtpu's own per-chip limits (what its compiler refuses beyond), see REFERENCE.md.
    "v5p": Target("v5p", "tpu", 8, int(95.74 * 2**30), topology="v5p:2x2x2",
                  tpu_kwargs=(("chip_config_name", "megacore"), ("chips_per_host_bounds", (2, 2, 1)))),
    "v5e": Target("v5e", "tpu", 8, int(15.75 * 2**30), topology="v5e:2x4",
                  tpu_kwargs=(("chip_config_name", "default"), ("chips_per_host_bounds", (2, 4, 1)))),
    "v6e": Target("v6e", "tpu", 8, int(31.25 * 2**30), topology="v6e:2x4",
                  tpu_kwargs=(("chip_config_name", "default"), ("chips_per_host_bounds", (2, 4, 1)))),
}


def prepare_environment() -> None:
    """Set what the plugins need before `import jax`; harmless (and too late to matter) afterwards."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) meant for real chips; compile-only processes (test
    # workers, several fit checks) would otherwise refuse each other.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise TargetError(f"unknown target {name!r}; known: {', '.join(sorted(TARGETS))}") from None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


PLUGIN_DISTRIBUTIONS = {
    "cuda": ("jax-cuda13-plugin", "jax-cuda13-pjrt", "nvidia-cudnn-cu13"),
    "tpu": ("libtpu",),
}
# Built per jaxlib release: must carry jaxlib's exact version (cuDNN and libtpu have their own numbering).
_VERSION_LOCKED = ("jax-cuda13-plugin", "jax-cuda13-pjrt")


def plugin_problems(platform: str, installed: dict[str, str | None], jaxlib_version: str) -> list[str]:
    """What is wrong with the compile plugins for `platform`, given {distribution: installed version or None}:
    one sentence per problem naming the distribution, its version and the install command; empty when fine."""
    if platform not in PLUGIN_DISTRIBUTIONS:
        raise TargetError(f"unknown platform {platform!r}; known: {', '.join(sorted(PLUGIN_DISTRIBUTIONS))}")
    problems = []
    for dist in PLUGIN_DISTRIBUTIONS[platform]:
        have = installed.get(dist)
        if have is None:
            if platform == "tpu":
                fix = f"pip install 'jax[tpu]=={jaxlib_version}'"
            elif dist == "nvidia-cudnn-cu13":
                fix = "cuDNN attention cannot be lowered without it: pip install --no-deps nvidia-cudnn-cu13"
            else:
                fix = (f"pip install --no-deps jax-cuda13-plugin=={jaxlib_version} "
                       f"jax-cuda13-pjrt=={jaxlib_version} nvidia-cudnn-cu13 (or pip install -e '.[cuda13]' on a GPU)")
            problems.append(f"{dist} is not installed: {fix}")
        elif dist in _VERSION_LOCKED and have != jaxlib_version:
            problems.append(f"{dist} {have} does not match jaxlib {jaxlib_version}: pip install --no-deps "
                            f"{dist}=={jaxlib_version}")
    return problems


def check_plugins(platform: str) -> None:
    """The compile plugin for `platform` is installed and built for the running jaxlib (else a TargetError)."""
    import jaxlib

    installed = {dist: _version(dist) for dist in PLUGIN_DISTRIBUTIONS.get(platform, ())}
    problems = plugin_problems(platform, installed, jaxlib.__version__)
    if problems:
        raise TargetError("; ".join(problems))


def load_gpu_spec(path: str | os.PathLike) -> str:
    """A GpuTargetConfigProto in text format, without the fields this jaxlib's proto does not know."""
    path = pathlib.Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise TargetError(f"cannot read GPU target spec {path}: {e}") from e
    if "gpu_device_info" not in text:
        raise TargetError(f"GPU target spec {path} is not a GpuTargetConfigProto text file (no gpu_device_info)")
    kept = [line for line in text.splitlines() if not line.strip().startswith(_UNKNOWN_SPEC_FIELDS)]
    return "\n".join(kept)


def compile_only_devices(name: str, num_devices: int | None = None, *, gpu_spec: str | None = None) -> list:
    """Devices of target `name` that jax can compile for (not run on). `num_devices` (GPUs: any count that
    fills whole 8-GPU hosts or one host; TPUs: the slice's own count) defaults to one slice / one 8-GPU node."""
    from jax.experimental import topologies

    t = target(name)
    check_plugins(t.platform)
    n = num_devices or t.devices_per_slice
    if t.platform == "cuda":
        spec_path = gpu_spec or (SPEC_DIR / t.gpu_spec)
        per_host = min(n, 8)
        if n % per_host:
            raise TargetError(f"{n} GPUs do not fill hosts of 8")
        try:
            topo = topologies.get_topology_desc(platform="cuda", topology=f"1x{n // per_host}x{per_host}",
                                                target_config=load_gpu_spec(spec_path))
        except Exception as e:  # the plugin's own message (e.g. a spec field it cannot parse)
            raise TargetError(f"CUDA topology from GPU target spec {spec_path} failed: {type(e).__name__}: {e} "
                              f"(a spec the plugin cannot parse, or jax imported before JAX_PLATFORMS=cpu was "
                              f"set)") from e
        return list(topo.devices)
    prepare_environment()  # read by libtpu when it loads, which happens below
    kwargs = dict(t.tpu_kwargs)
    slices = max(1, n // t.devices_per_slice)
    if n != slices * t.devices_per_slice:
        raise TargetError(f"{name} slices have {t.devices_per_slice} devices; {n} is not a multiple")
    try:
        topo = topologies.get_topology_desc(topology_name=t.topology, platform="tpu", num_slices=slices,
                                            wrap=_NO_WRAP, **kwargs)
    except Exception as e:
        raise TargetError(f"TPU topology {t.topology} failed: {type(e).__name__}: {e}") from e
    return list(topo.devices)


def mesh_for(name: str, axes: dict[str, int], *, gpu_spec: str | None = None):
    """A `jax.sharding.Mesh` over the target's compile-only devices with the given axis sizes (in order)."""
    import numpy as np
    from jax.sharding import Mesh

    size = int(np.prod(list(axes.values())))
    devices = compile_only_devices(name, size, gpu_spec=gpu_spec)
    return Mesh(np.asarray(devices).reshape(tuple(axes.values())), tuple(axes))
