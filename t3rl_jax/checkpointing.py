"""Training checkpoints: params, optimizer state and a JSON `extra` block per step, with keep-N and resume.

    ckpt = Checkpointer(f"{workdir}/checkpoints", keep=3, async_save=True)
    ckpt.save(step, params=params, opt_state=opt_state,
              extra={"data": it.get_state(), "rng": key_data_as_list, "nan_steps": 0})
    ...
    if ckpt.latest_step() is not None:
        step, params, opt_state, extra = ckpt.restore(
            abstract_params=abstract_params, abstract_opt_state=abstract_opt_state)
    ckpt.close()                      # waits for a pending async save

    params = restore_params_only("runs/stage1/checkpoints", abstract_params)   # init_from another run

    with SigtermFlag() as stop:       # the loop checks `stop` after each step, saves and exits 0
        ...

Layout: `DIRECTORY/<step>/{params,opt_state,reference,extra}` written by one Orbax `CheckpointManager`
(`reference`, the KL reference policy, only when given). `params/` is
the same Orbax tree layout `t3rl_jax.params_checkpoint` writes, so a step directory can also serve as a params
checkpoint. Params and opt_state are pytrees of jax arrays (a pure dict from `nnx.to_pure_dict`, an optax
state, ...). Restores go straight onto the shardings carried by the abstract trees (`jax.ShapeDtypeStruct`
leaves with `.sharding`; real arrays work too); before anything is read, the stored shapes are compared with
the abstract ones so a checkpoint of another model shape stops with the offending tensor path and both shapes.
An interrupted async save leaves only a temporary directory, which Orbax ignores and cleans up. A step whose files
were damaged afterwards (a truncated array file) is skipped by `restore_newest_readable`, which says which step it
skipped and why, and names the way out when no step is readable.

Tests only: `T3RL_TEST_KILL_AT=<point>:<step>` SIGKILLs the process at a named point (`kill_point`; the run loop
has "update" and "save"). "commit:<step>" is reached from inside Orbax's background commit thread, once that step's
optimizer-state arrays are written and before Orbax commits the step (its temporary directory still on disk).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

__all__ = ["CheckpointMismatchError", "CheckpointUnreadableError", "Checkpointer", "SigtermFlag",
           "restore_params_only"]

ITEMS = ("params", "opt_state", "reference")
log = logging.getLogger(__name__)
KILL_ENV = "T3RL_TEST_KILL_AT"


def kill_point(point: str, step: int, *, detail: str = "") -> None:
    """SIGKILL this process when KILL_ENV is "<point>:<step>" (tests only: a crash at an exact point, no timing)."""
    if os.environ.get(KILL_ENV) == f"{point}:{step}":
        log.warning("%s=%s: killing this process%s", KILL_ENV, os.environ[KILL_ENV], detail)
        for handler in logging.getLogger().handlers + log.handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)


class _KillInCommit:
    """A commit future that waits for the wrapped handler's writes, then reaches kill point "commit:<step>". Orbax
    waits on it in its background commit thread, before the step's temporary directory is renamed."""

    def __init__(self, futures, step: int, directory):
        self._futures, self._step, self._directory = list(futures or ()), step, directory

    def result(self, timeout=None):
        for f in self._futures:
            f.result(timeout=timeout)
        where = os.fspath(getattr(self._directory, "path", self._directory))  # a PathAwaitingCreation or a path
        kill_point("commit", self._step, detail=f" inside the async commit of step {self._step} (thread "
                   f"{threading.current_thread().name}); temporary directory on disk: {os.path.isdir(where)} {where}")

    def cancel(self):
        return all(f.cancel() for f in self._futures)


class _CommitKill:
    """Makes a StandardCheckpointHandler's commit pass kill point "commit:<step>" (tests only). Its own `async_save`
    is replaced on the instance, not subclassed: Orbax finds a handler's save arguments by its exact type."""

    def __init__(self, handler: ocp.StandardCheckpointHandler):
        self.handler, self.step = handler, -1  # step: set by Checkpointer.save before each save
        save = handler.async_save

        async def async_save(directory, *args, **kwargs):
            futures = await save(directory, *args, **kwargs)
            return [_KillInCommit(futures, self.step, directory)]

        handler.async_save = async_save


class CheckpointMismatchError(ValueError):
    """The stored tree does not fit the model/optimizer it is restored into."""


class CheckpointUnreadableError(RuntimeError):
    """No checkpoint step of a directory could be read back."""


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path_str(path) -> str:
    return "/".join(_key_name(k) for k in path)


def _shapes_by_path(tree) -> dict[str, tuple[int, ...]]:
    """{'a/b/0': shape} for every array-like leaf; None leaves (optax EmptyState, ...) hold nothing."""
    # NNX Variables (inside optax states built from nnx.State params) expose `.shape` but are pytree nodes
    # whose array sits under `value`, which is how Orbax names the stored tensor: descend into them.
    leaves, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, nnx.Variable))
    return {_path_str(path): tuple(leaf.shape) for path, leaf in leaves if hasattr(leaf, "shape")}


def _stored_tree(metadata):
    """The tree of ArrayMetadata inside whatever Orbax's metadata call returned."""
    metadata = getattr(metadata, "item_metadata", metadata)
    return getattr(metadata, "tree", metadata)


def check_shapes(stored_metadata, abstract_tree, *, what: str, where: str) -> None:
    """Raise CheckpointMismatchError naming the first tensor whose path or shape differs."""
    stored = _shapes_by_path(_stored_tree(stored_metadata))
    wanted = _shapes_by_path(abstract_tree)
    for path, shape in wanted.items():
        if path not in stored:
            raise CheckpointMismatchError(
                f"{where}: {what} tensor {path!r} (shape {shape}) is not in the checkpoint; it holds "
                f"{len(stored)} tensors, e.g. {sorted(stored)[:3]}. The checkpoint is from another model or "
                f"optimizer.")
        if stored[path] != shape:
            raise CheckpointMismatchError(
                f"{where}: {what} tensor {path!r} has shape {stored[path]} in the checkpoint but {shape} in the "
                f"model being restored; the checkpoint is from another model shape.")
    extra = sorted(set(stored) - set(wanted))
    if extra:
        raise CheckpointMismatchError(
            f"{where}: the checkpoint's {what} tensor {extra[0]!r} (shape {stored[extra[0]]}) has no place in "
            f"the tree being restored ({len(extra)} such tensors); the checkpoint is from another model or "
            f"optimizer.")


def _abstract(tree):
    """ShapeDtypeStruct leaves with a sharding (a leaf without one goes to the first device)."""
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def one(leaf):
        sharding = getattr(leaf, "sharding", None) or default
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


class Checkpointer:
    """Orbax CheckpointManager for (params, opt_state, extra) at integer steps; see the module docstring."""

    def __init__(self, directory: str | os.PathLike, *, keep: int, async_save: bool, read_only: bool = False):
        if keep < 1:
            raise ValueError(f"checkpoint keep must be >= 1, got {keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        # Handlers named up front so a fresh manager can read metadata of steps it did not write.
        self._commit_kill = (_CommitKill(ocp.StandardCheckpointHandler())
                             if async_save and os.environ.get(KILL_ENV, "").startswith("commit:") else None)
        handlers = {
            "params": ocp.StandardCheckpointHandler(),
            "opt_state": self._commit_kill.handler if self._commit_kill else ocp.StandardCheckpointHandler(),
            "reference": ocp.StandardCheckpointHandler(),
            "extra": ocp.JsonCheckpointHandler(),
        }
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, *, params, opt_state, extra: dict[str, Any], reference=None) -> bool:
        """Write step `step` (in the background when async). False when that step is already saved.

        `extra` must be JSON-serialisable (iterator state, RNG key data as a list of ints, counters).
        `reference` (optional) is a second params tree, e.g. the KL reference policy.
        The arrays are copied off the device before this returns, so the caller may update them at once.
        """
        if not isinstance(extra, dict):
            raise TypeError(f"checkpoint extra must be a dict, got {type(extra).__name__}")
        if step in self._manager.all_steps():
            return False
        items = dict(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                     extra=ocp.args.JsonSave(extra))
        if reference is not None:
            items["reference"] = ocp.args.StandardSave(reference)
        if self._commit_kill is not None:
            self._commit_kill.step = step
        return bool(self._manager.save(step, args=ocp.args.Composite(**items)))

    def _resolve_step(self, step: int | None) -> int:
        self._manager.reload()
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; it holds steps {steps}")
        return step

    def restore_items(self, step: int | None = None, **abstract) -> tuple[int, dict[str, Any]]:
        """(step, {name: tree, "extra": dict}) for the items named in `abstract` (params=..., opt_state=...,
        reference=...: abstract trees whose shardings the arrays are placed on); default step: the latest.

        Every requested item is checked against the stored shapes before anything is read; an item the step does
        not hold raises CheckpointMismatchError naming it and the step.
        """
        unknown = sorted(set(abstract) - set(ITEMS))
        if unknown:
            raise ValueError(f"unknown checkpoint items {unknown}; known: {list(ITEMS)}")
        step = self._resolve_step(step)
        where = f"checkpoint {self.directory}/{step}"
        metadata = self._manager.item_metadata(step)
        items = {"extra": ocp.args.JsonRestore()}
        for name, tree in abstract.items():
            stored = metadata.get(name) if hasattr(metadata, "get") else metadata[name]
            if stored is None:
                raise CheckpointMismatchError(f"{where} holds no {name!r} item (it holds "
                                              f"{sorted(k for k, v in metadata.items() if v is not None)})")
            check_shapes(stored, tree, what=name, where=where)
            items[name] = ocp.args.StandardRestore(_abstract(tree))
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        out = {name: restored[name] for name in abstract}
        out["extra"] = dict(restored["extra"])
        return step, out

    def restore(self, step: int | None = None, *, abstract_params, abstract_opt_state=None):
        """(step, params, opt_state, extra) of `step` (default: the latest) on the abstract trees' shardings.

        With `abstract_opt_state=None` the optimizer state is not read and None is returned for it.
        """
        abstract = {"params": abstract_params}
        if abstract_opt_state is not None:
            abstract["opt_state"] = abstract_opt_state
        step, items = self.restore_items(step, **abstract)
        return step, items["params"], items.get("opt_state"), items["extra"]

    def restore_newest_readable(self, **abstract) -> tuple[int, dict[str, Any], list[tuple[int, str]]]:
        """Like `restore_items` on the newest step that reads back whole, trying older steps when one is damaged.

        Returns (step, items, skipped) with skipped = [(step, why)] for every newer step that could not be read
        (each also logged as a warning). A shape or item mismatch is not damage (every step of the run would
        share it) and raises at once. No readable step: CheckpointUnreadableError naming the directory, every
        step's reason and the way out.
        """
        self._manager.reload()
        skipped: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            try:
                got, items = self.restore_items(step, **abstract)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - TensorStore / JSON / OS errors all mean "this step is damaged"
                why = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                log.warning("checkpoint %s/%d is unreadable, skipping it: %s", self.directory, step, why)
                skipped.append((step, why))
                continue
            return got, items, skipped
        reasons = "; ".join(f"step {s}: {why}" for s, why in skipped) or "it holds no checkpoint step"
        raise CheckpointUnreadableError(
            f"no readable checkpoint in {self.directory} ({reasons}). Start afresh with --config.resume=never "
            f"(or move {self.directory} away).")

    def restore_params(self, step: int | None = None, *, abstract_params):
        """Only the params of `step` (default: the latest)."""
        return self.restore(step, abstract_params=abstract_params)[1]

    def wait(self) -> None:
        """Block until a pending async save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def restore_params_only(directory_or_checkpoint, abstract_params, *, step: int | None = None):
    """Params from another run, for `init_from`.

    Accepts a `Checkpointer`, a checkpoint directory of a run (its latest step, or `step`), or a directory that
    holds a `params/` tree itself (one step of a run, or a `t3rl_jax.params_checkpoint` directory).
    """
    if isinstance(directory_or_checkpoint, Checkpointer):
        return directory_or_checkpoint.restore_params(step, abstract_params=abstract_params)
    path = os.path.abspath(os.fspath(directory_or_checkpoint))
    params_dir = os.path.join(path, "params")
    if os.path.isdir(params_dir):
        if step is not None:
            raise ValueError(f"{path} is a single checkpoint (it holds params/); do not pass step={step}")
        checkpointer = ocp.StandardCheckpointer()
        check_shapes(checkpointer.metadata(params_dir), abstract_params, what="params", where=f"checkpoint {path}")
        return checkpointer.restore(params_dir, _abstract(abstract_params))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"init checkpoint {path} does not exist")
    checkpointer = Checkpointer(path, keep=1, async_save=False, read_only=True)
    try:
        if checkpointer.latest_step() is None:
            raise FileNotFoundError(
                f"{path} holds neither a params/ tree nor numbered step checkpoints written by Checkpointer")
        return checkpointer.restore_params(step, abstract_params=abstract_params)
    finally:
        checkpointer.close()


class SigtermFlag:
    """A SIGTERM (or `signum`) handler that only sets a flag; the previous handler comes back on close().

    The loop polls `bool(flag)` (or `flag.is_set`) between steps, saves a checkpoint and exits 0. Signal
    handlers can only be installed from the main thread.
    """

    def __init__(self, signum: int = signal.SIGTERM):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("SigtermFlag must be created in the main thread (Python delivers signals there)")
        self.signum = signum
        self._event = threading.Event()
        self._previous = signal.signal(signum, self._handle)
        self._closed = False

    def _handle(self, signum, frame) -> None:
        self._event.set()

    @property
    def is_set(self) -> bool:
        return self._event.is_set()

    def __bool__(self) -> bool:
        return self._event.is_set()

    def close(self) -> None:
        if not self._closed:
            # None means the old handler was not installed from Python; the default action is the safe fallback.
            signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
            self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
