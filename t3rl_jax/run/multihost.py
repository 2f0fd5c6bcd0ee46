"""What makes the run multi-host: a rollout engine over this host's devices fed the trained parameters, a train step
whose host batches become global arrays, and rollout metrics combined over hosts. One process: the global mesh is
the local one and everything here hands back what the single-process run used before.

Rollouts are data-parallel over hosts: each process decodes its own groups (`distributed.run_shared`) on a
host-local mesh, with its own environment pool. The trained parameters live on the global mesh; each step they are
gathered to the decode layout (every axis but `tensor` replicated, the layout the engine gathers to per call anyway)
by one jitted reshard, and this host's shards of that array become the local engine's parameters without a copy.
"""

from __future__ import annotations

import numpy as np
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from t3rl_jax import distributed
from t3rl_jax import sharding as sh
from t3rl_jax.rl.train_step import GRPOStep

__all__ = ["local_mesh", "ToLocal", "HostEngine", "host_engine", "train_step", "rollout_summary"]

SUMMED = ("rollout/episodes", "rollout/env_late_replies", "rollout/env_failed", "rollout/truncated_replies")
MAXED = ("rollout/wall_s",)


def local_mesh(mesh: Mesh) -> Mesh:
    """This process's devices as a mesh with the global axes: each tensor-parallel group whole, the groups along
    `data` (the engine splits decode slots over it). A device keeps its `tensor` coordinate, so the decode-layout
    shards of the global parameters are this mesh's shards as they are. ValueError if a tensor group spans hosts."""
    if jax.process_count() == 1:
        return mesh
    axes = list(mesh.axis_names)
    t = axes.index("tensor")
    groups = np.moveaxis(mesh.devices, t, -1).reshape(-1, mesh.devices.shape[t])
    me = jax.process_index()
    local = [g for g in groups if all(d.process_index == me for d in g)]
    split = [g for g in groups if any(d.process_index == me for d in g) and not all(d.process_index == me for d in g)]
    if split or not local:
        raise ValueError(f"mesh.tensor={mesh.shape['tensor']}: a tensor-parallel group spans processes (process "
                         f"{me} has {jax.local_device_count()} devices); rollouts decode on one host's devices")
    shape = {a: 1 for a in axes}
    shape.update(data=len(local), tensor=mesh.shape["tensor"])
    devices = np.asarray(local).reshape([shape[a] for a in axes])
    return Mesh(devices, tuple(axes), axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


def _tensor_only(spec: PartitionSpec) -> PartitionSpec:
    return PartitionSpec(*(("tensor" if "tensor" in sh.spec_axes(e) else None) for e in spec))


class ToLocal:
    """Global parameters -> the same values on `local` (one collective: the reshard to the decode layout)."""

    def __init__(self, mesh: Mesh, local: Mesh, param_shardings):
        is_sharding = lambda x: isinstance(x, NamedSharding)  # noqa: E731
        gathered = jax.tree.map(lambda s: NamedSharding(mesh, _tensor_only(s.spec)), param_shardings,
                                is_leaf=is_sharding)
        self.local = jax.tree.map(lambda s: NamedSharding(local, _tensor_only(s.spec)), param_shardings,
                                  is_leaf=is_sharding)
        self._gather = jax.jit(lambda p: p, out_shardings=gathered)

    def __call__(self, params):
        def one(a, sharding):
            by_device = {s.device: s.data for s in a.addressable_shards}
            return jax.make_array_from_single_device_arrays(
                a.shape, sharding, [by_device[d] for d in sharding.mesh.devices.flat])

        return jax.tree.map(one, self._gather(params), self.local)


class HostEngine:
    """The engine over this host's devices; `update_params` takes the trained (global) parameters. Everything else
    is the wrapped engine's."""

    def __init__(self, engine, to_local: ToLocal):
        self.engine, self.to_local = engine, to_local

    def update_params(self, params) -> None:
        self.engine.update_params(self.to_local(params))

    def __getattr__(self, name):
        return getattr(self.engine, name)


def host_engine(setup, params, build):
    """`build(setup, params_on_local_mesh)` -> the engine, wrapped when multi-host."""
    if jax.process_count() == 1:
        return build(setup, params)
    to_local = ToLocal(setup.mesh, setup.local_mesh, setup.param_shardings)
    return HostEngine(build(setup, to_local(params)), to_local)


class _GlobalInputs:
    """A jitted function whose host-array batch arguments ([rows, length] and larger) become global arrays."""

    def __init__(self, fn, sharding):
        self.fn, self.sharding = fn, sharding

    def _convert(self, args):
        return jax.tree.map(lambda x: distributed.global_array(self.sharding, x)
                            if isinstance(x, np.ndarray) and x.ndim >= 2 else x, args)

    def __call__(self, *args):
        return self.fn(*self._convert(args))

    def lower(self, *args):
        return self.fn.lower(*self._convert(args))


class GlobalBatchStep(GRPOStep):
    """GRPOStep fed global batch arrays: every process builds the same host batch from the gathered episodes and
    places only its devices' rows (`jax.make_array_from_process_local_data`)."""

    def functions_for(self, num_slots):
        return tuple(_GlobalInputs(f, self._shardings[2]) for f in super().functions_for(num_slots))


def train_step(setup, params) -> GRPOStep:
    cls = GlobalBatchStep if distributed.is_multihost() else GRPOStep
    return cls(setup.bundle.train_model(params), setup.optimizer, setup.step_settings,
               param_shardings=setup.param_shardings, opt_shardings=setup.opt_shardings,
               batch_sharding=setup.batch_sharding)


def rollout_summary(driver) -> tuple[dict, float]:
    """(the driver's rollout/* metrics over every host: counts summed, wall time the slowest host's, rates
    averaged over hosts; the slowest host's environment seconds)."""
    summary, env_s = driver.metrics.summary(), driver.metrics.env_seconds
    if not distributed.is_multihost():
        return summary, env_s
    every = distributed.allgather_objects((summary, env_s))
    out = {}
    for key in summary:
        values = [s[key] for s, _ in every]
        out[key] = float(sum(values) if key in SUMMED else max(values) if key in MAXED else np.mean(values))
    return out, max(e for _, e in every)
