"""The one home of mesh axes and logical-axis rules.

Models and losses name *logical* axes only (`batch`, `length`, `embed`, `heads`, ...); this module
maps them onto the four mesh axes. Weights are sharded FSDP-style over `fsdp` (optionally also
`data`) on their `embed` dimension and tensor-parallel over `tensor` on heads / mlp / vocab;
activations put `batch` over (`data`, `fsdp`) and `length` over `sequence` (context parallelism).
Within one array a mesh axis is used at most once, first name first: an activation
[batch, length, embed] therefore leaves `embed` whole because `batch` already took `fsdp`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# logical name -> mesh axes (a tuple, possibly empty = replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", ("sequence",)),
    ("vocab", ("tensor",)),
    ("embed", ("fsdp",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    ("mlp", ("tensor",)),
    ("layers", ()),
    ("norm", ()),
)


def logical_axis_rules(fsdp_over_data: bool = False,
                       fsdp_over_sequence: bool = False) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The rules table, optionally sharding weights (their `embed` dimension) also over `data`
    (ZeRO-3 across replicas) and/or `sequence` (context-parallel devices then hold distinct weight
    shards, as in MaxText, instead of CP copies of the same shard)."""
    embed = ("data",) * fsdp_over_data + ("fsdp",) + ("sequence",) * fsdp_over_sequence
    return tuple((name, embed if name == "embed" else axes) for name, axes in LOGICAL_AXIS_RULES)


def flax_axis_rules(rules=LOGICAL_AXIS_RULES) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """The rules in the format of `nnx.logical_axis_rules`, for creating a model with eager sharding
    under `jax.set_mesh(mesh)` (flax applies them without the at-most-once rule, fine for weights)."""
    return tuple((name, None if not axes else axes[0] if len(axes) == 1 else axes) for name, axes in rules)


def _config_get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


# ----------------------------------------------------------------------------- mesh


def mesh_shape(config: Any, device_count: int) -> tuple[int, ...]:
    """Axis sizes (data, fsdp, tensor, sequence) from a config; at most one -1 takes the remaining devices."""
    sizes = []
    for axis in MESH_AXES:
        size = _config_get(config, axis, 1)
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ValueError(f"mesh axis {axis!r} must be a positive int or -1, got {size!r}")
        sizes.append(int(size))
    fill = [axis for axis, size in zip(MESH_AXES, sizes) if size == -1]
    if len(fill) > 1:
        raise ValueError(f"only one mesh axis may be -1 (fill), got {fill}")
    fixed = math.prod(size for size in sizes if size != -1)
    if fill:
        if device_count % fixed:
            raise ValueError(f"mesh axes {dict(zip(MESH_AXES, sizes))} with product {fixed} of the fixed axes "
                             f"do not divide the {device_count} devices")
        sizes[MESH_AXES.index(fill[0])] = device_count // fixed
    elif fixed != device_count:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} has {fixed} devices but {device_count} are available")
    return tuple(sizes)


def initialize_distributed(config: Any) -> bool:
    """Joins a multi-host job when a coordinator address is configured; returns whether it did.

    Afterwards the job's shape is checked against the config (`check_processes`), so a process count that the
    coordinator does not confirm stops here with the keys to fix instead of deep inside the first collective.
    """
    address = _config_get(config, "coordinator_address")
    if address and not jax.distributed.is_initialized():
        if "cpu" in (jax.config.jax_platforms or "").split(","):
            # CPU processes exchange collectives over gloo (loopback in tests); XLA's default CPU
            # collectives stay inside one process.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=address,
                                   num_processes=_config_get(config, "num_processes"),
                                   process_id=_config_get(config, "process_id"),
                                   # Generous: a loaded host (a CI machine running several jobs) can take minutes
                                   # to reach exit; the default (300 s) aborts its healthy peers.
                                   shutdown_timeout_seconds=1800)
    check_processes(config)
    return bool(address)


def check_processes(config: Any, *, process_count: int | None = None, process_index: int | None = None) -> None:
    """ValueError naming mesh.num_processes / mesh.process_id when they disagree with the running job."""
    count = jax.process_count() if process_count is None else process_count
    index = jax.process_index() if process_index is None else process_index
    wanted = _config_get(config, "num_processes", 1)
    address = _config_get(config, "coordinator_address")
    if wanted != count:
        how = (f"the coordinator at {address} reports {count}" if address
               else "no mesh.coordinator_address is set, so this is a single process")
        raise ValueError(f"mesh.num_processes={wanted} but the job has {count} process(es): {how}")
    if count > 1 and _config_get(config, "process_id", 0) != index:
        raise ValueError(f"mesh.process_id={_config_get(config, 'process_id')} but the coordinator assigned "
                         f"process index {index}")


def make_mesh(config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh with axes (data, fsdp, tensor, sequence) from a mapping/ConfigDict of axis sizes.

    Axes are Auto (GSPMD propagation) so `with_sharding_constraint` and NamedSharding jit apply.
    """
    initialize_distributed(config)
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def spec_axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, a name, or a tuple of names) as a tuple."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def axis_size(mesh: Mesh, axes: str | Sequence[str]) -> int:
    return math.prod(mesh.shape[a] for a in spec_axes(axes))


# ----------------------------------------------------------------------------- validation


def validate(mesh: Mesh, *, seq_len: int | None = None, num_heads: int | None = None,
             num_kv_heads: int | None = None, batch_size: int | None = None,
             rules=LOGICAL_AXIS_RULES) -> None:
    """Raises a ValueError naming both numbers before anything compiles."""
    table = dict(rules)
    cp = axis_size(mesh, table["length"])
    if seq_len is not None and cp > 1 and seq_len % (2 * cp):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2*context parallelism = {2 * cp} "
                         f"(load balancing splits each sequence into 2*CP chunks)")
    tp = axis_size(mesh, table["heads"])
    if num_heads is not None and num_heads % tp:
        raise ValueError(f"query heads {num_heads} are not divisible by the tensor axis size {tp}")
    if num_kv_heads is not None and num_kv_heads % axis_size(mesh, table["kv_heads"]):
        raise ValueError(f"kv heads {num_kv_heads} are not divisible by the tensor axis size "
                         f"{axis_size(mesh, table['kv_heads'])}")
    dp = axis_size(mesh, table["batch"])
    if batch_size is not None and batch_size % dp:
        raise ValueError(f"batch size {batch_size} is not divisible by the batch-sharding axes size {dp} "
                         f"({' x '.join(table['batch'])})")


# ----------------------------------------------------------------------------- specs


def logical_to_spec(logical_names: Sequence[str | None], rules=LOGICAL_AXIS_RULES, *,
                    mesh: Mesh | None = None, shape: Sequence[int] | None = None,
                    what: str = "array") -> PartitionSpec:
    """PartitionSpec for one array's logical axis names; each mesh axis is used at most once.

    With `mesh` and `shape`, a dimension not divisible by its mesh axes raises (naming `what`).
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical_names):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"{what}: logical axis {name!r} has no sharding rule (known: {sorted(table)})")
        axes = tuple(a for a in table[name] if a not in used and (mesh is None or mesh.shape[a] > 1))
        if mesh is not None and shape is not None and axes and shape[dim] % axis_size(mesh, axes):
            raise ValueError(f"{what}: dimension {dim} ({name!r}) of size {shape[dim]} is not divisible by "
                             f"mesh axes {axes} of size {axis_size(mesh, axes)}")
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def _variable_logical_names(variable: nnx.Variable) -> tuple | None:
    metadata = variable.get_metadata()
    names = metadata.get("out_sharding") or metadata.get("sharding_names")
    return tuple(names) if names else None


def state_shardings(state: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for a pytree of NNX Variables (params, or an `nnx.Optimizer`'s state).

    Variables carry their logical names in `out_sharding` metadata; those without names and plain
    arrays are replicated. The result has the same structure as `state` with Variables holding
    NamedShardings, so it can be passed as jit in/out shardings for `nnx.state(...)`.
    """

    def one(path, leaf):
        what = jax.tree_util.keystr(path)
        if isinstance(leaf, nnx.Variable):
            value = leaf.get_value()
            names = _variable_logical_names(leaf)
            shape = getattr(value, "shape", None)
            if names is None or shape is None:
                return leaf.replace(NamedSharding(mesh, PartitionSpec()))
            if len(names) != len(shape):
                raise ValueError(f"{what}: logical names {names} do not match shape {tuple(shape)}")
            return leaf.replace(NamedSharding(mesh, logical_to_spec(names, rules, mesh=mesh, shape=shape, what=what)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def optax_state_shardings(opt_state: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a raw optax state: each leaf whose key path ends with a parameter's key path
    (and has its shape) gets that parameter's sharding (Adam's mu/nu); everything else (step
    counts) is replicated.
    """
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_shardings = jax.tree.leaves(param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    if len(flat_params) != len(flat_shardings):
        raise ValueError(f"params have {len(flat_params)} leaves but param_shardings has {len(flat_shardings)}")
    by_path = {tuple(path): (np.shape(leaf), sharding)
               for (path, leaf), sharding in zip(flat_params, flat_shardings)}
    longest = max((len(p) for p in by_path), default=0)

    def one(path, leaf):
        path = tuple(path)
        for n in range(min(longest, len(path)), 0, -1):
            hit = by_path.get(path[-n:])
            if hit is not None and hit[0] == np.shape(leaf):
                return hit[1]
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(one, opt_state)


def batch_shardings(batch: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
    """Shardings for a batch pytree: axis 0 is `batch`, axis 1 (if any) is `length`, the rest whole."""

    def one(path, leaf):
        shape = np.shape(leaf)
        if not shape:
            return NamedSharding(mesh, PartitionSpec())
        names = ("batch", "length")[: len(shape)] + (None,) * max(0, len(shape) - 2)
        what = f"batch{jax.tree_util.keystr(path)}"
        return NamedSharding(mesh, logical_to_spec(names, rules, mesh=mesh, shape=shape, what=what))

    return jax.tree_util.tree_map_with_path(one, batch)


def make_activation_constraint(mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """The `activation_constraint(x, logical_names)` hook handed to the model."""

    def activation_constraint(x, logical_names):
        if len(logical_names) != x.ndim:
            raise ValueError(f"activation of shape {x.shape} given {len(logical_names)} logical names "
                             f"{tuple(logical_names)}")
        spec = logical_to_spec(logical_names, rules, mesh=mesh, shape=x.shape, what="activation")
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return activation_constraint
