"""Host-side agreement between the processes of a multi-host job; every function is the identity on one process.

The rule that keeps hosts from diverging: whatever decides control flow (which groups are kept, whether to refill,
"every episode failed", stop requests, validation scores) is computed from data every process holds identically,
and that data is made identical here: episodes are rolled out where they are assigned (`run_shared`: group g on
process g % process_count, so a GRPO group is whole on one host) and their trajectories gathered to every process in
request order; flags are OR-ed over processes (`any_process`). Every function here is a collective: all processes
must call it, in the same order.
"""

from __future__ import annotations

import dataclasses
import itertools
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from orbax.checkpoint import multihost as orbax_multihost

__all__ = ["is_multihost", "allgather_objects", "any_process", "barrier", "run_shared", "owner_of", "global_array"]


def is_multihost() -> bool:
    return jax.process_count() > 1


def allgather_objects(obj: Any) -> list[Any]:
    """Every process's `obj` (picklable), in process order. The pickles travel as uint8 arrays, padded to the
    longest; processes of one job run the same code, so unpickling what a peer sent is as safe as our own."""
    if not is_multihost():
        return [obj]
    data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray(data.size, np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    every = np.asarray(multihost_utils.process_allgather(padded))
    return [pickle.loads(every[i, :int(n)].tobytes()) for i, n in enumerate(sizes)]


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on any (a SIGTERM that reached one host stops them all)."""
    if not is_multihost():
        return bool(flag)
    return bool(np.asarray(multihost_utils.process_allgather(np.asarray(bool(flag), np.int32))).any())


# Barrier ids of the coordination service are single-use; every process calls `barrier` in the same order, so a
# per-process counter gives every process the same fresh id.
_barrier_count = itertools.count()
BARRIER_TIMEOUT_S = 3600  # the primary's HF export of a 4B model (gather + safetensors write) precedes the last one


def barrier(name: str, *, timeout_s: int = BARRIER_TIMEOUT_S) -> None:
    """Every process waits here until all have arrived (e.g. before peers read a directory process 0 renamed).

    A barrier of jax.distributed's coordination service, not a collective: a peer that leaves a gloo all-gather
    first may exit and close its sockets while the slower process is still reading its share, which then fails
    with "Connection closed by peer" (how loaded CI machines failed at the run's last barrier)."""
    if is_multihost():
        orbax_multihost.get_barrier_sync_fn()(key=f"t3rl_{name}_{next(_barrier_count)}",
                                              timeout_ms=timeout_s * 1000)


def owner_of(group_id: int) -> int:
    return group_id % jax.process_count()


def _compact(traj):
    """The trajectory with its token lists as numpy arrays (a few bytes per token on the wire, not a pickled int
    object each)."""
    return dataclasses.replace(traj, token_ids=np.asarray(traj.token_ids, np.int32),
                               loss_mask=np.asarray(traj.loss_mask, np.int8),
                               logprobs=np.asarray(traj.logprobs, np.float32))


def _expand(traj):
    return dataclasses.replace(traj, token_ids=traj.token_ids.tolist(), loss_mask=traj.loss_mask.tolist(),
                               logprobs=traj.logprobs.tolist())


def run_shared(run: Callable[[list], list], requests: Sequence) -> list:
    """`run(requests) -> trajectories` over the whole job: this process runs the requests of its own groups
    (`owner_of(request.group_id)`) and every process gets all trajectories back, in request order.

    On one process this is `run(requests)`. Multi-host, every process holds the same gathered copies (log-probs as
    float32, which they are when sampled), so whatever is computed from them agrees bit for bit."""
    requests = list(requests)
    if not is_multihost():
        return run(requests)
    me = jax.process_index()
    mine = [i for i, r in enumerate(requests) if owner_of(r.group_id) == me]
    local = run([requests[i] for i in mine]) if mine else []
    if len(local) != len(mine):
        raise ValueError(f"process {me}: rollout returned {len(local)} trajectories for {len(mine)} requests")
    out: list = [None] * len(requests)
    for part in allgather_objects([(i, _compact(t)) for i, t in zip(mine, local)]):
        for i, t in part:
            out[i] = _expand(t)
    missing = [i for i, t in enumerate(out) if t is None]
    if missing:
        raise ValueError(f"run_shared: no process returned requests {missing[:5]} (of {len(requests)})")
    return out


def global_array(sharding: jax.sharding.Sharding, data: np.ndarray) -> jax.Array:
    """A host array that every process holds identically -> a jax.Array laid out by `sharding` over the job's
    devices (each process places only its addressable shards; no data moves between hosts). One process:
    `jax.device_put`, as before."""
    if not is_multihost():
        return jax.device_put(data, sharding)
    data = np.asarray(data)
    return jax.make_array_from_process_local_data(sharding, data, data.shape)
