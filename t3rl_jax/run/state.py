"""TrainState: everything a run needs to continue exactly where it stopped, saved and restored as one unit.

step, params, optimizer state, the KL reference policy (the initial RL policy: after warm start, before GRPO step 0;
never the resumed params), the prompt iterator's state, the best validation score and the counters. A checkpoint
that lacks the reference while KL is on, or holds one of another shape, stops with the step directory named.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
from flax import nnx

from t3rl_jax.checkpointing import Checkpointer

log = logging.getLogger(__name__)
FORMAT = 2  # extra["format"]: 2 = this layout (reference item, best, counters)


@dataclasses.dataclass
class Best:
    score: float = -1.0  # best validation accuracy so far (-1: none yet)
    step: int = -1       # the step it was reached at; its params are kept in WORKDIR/best
    since: int = 0       # evaluations since then (plateau patience counts these)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class TrainState:
    step: int                 # optimizer steps done
    params: Any               # nnx.State on the mesh
    opt_state: Any
    reference: Any | None     # nnx.State, or None when KL is off
    data: dict                # PromptIterator.get_state()
    best: Best = dataclasses.field(default_factory=Best)
    nan_streak: int = 0       # consecutive steps whose update was skipped as non-finite

    def extra(self) -> dict:
        return {"format": FORMAT, "data": self.data, "best": self.best.as_dict(),
                "counters": {"nan_streak": self.nan_streak}}


def copy_tree(params):
    """A copy with its own buffers (the reference must not alias params the optimizer donates)."""
    return jax.tree.map(lambda x: x.copy(), params)


def save(ckpt: Checkpointer, state: TrainState) -> bool:
    reference = nnx.to_pure_dict(state.reference) if state.reference is not None else None
    return ckpt.save(state.step, params=nnx.to_pure_dict(state.params), opt_state=state.opt_state,
                     extra=state.extra(), reference=reference)


def _from_pure(abstract_params, pure):
    params = jax.tree.map(lambda x: x, abstract_params)
    nnx.replace_by_pure_dict(params, pure)
    return params


def restore(ckpt: Checkpointer, setup) -> tuple[TrainState, list[tuple[int, str]]]:
    """The newest readable TrainState in `ckpt` (damaged newer steps skipped, each with its reason)."""
    abstract = {"params": nnx.to_pure_dict(setup.bundle.abstract_params), "opt_state": setup.abstract_opt}
    if setup.step_settings.loss.needs_reference:
        abstract["reference"] = abstract["params"]
    step, items, skipped = ckpt.restore_newest_readable(**abstract)
    extra = items["extra"]
    if extra.get("format") != FORMAT:
        raise ValueError(f"checkpoint {ckpt.directory}/{step} was written in an older layout (format "
                         f"{extra.get('format')!r}, this code reads {FORMAT}); start afresh with "
                         f"--config.resume=never, or init_from one of its params (WORKDIR/checkpoints/STEP)")
    reference = items.get("reference")
    state = TrainState(step=step, params=_from_pure(setup.bundle.abstract_params, items["params"]),
                       opt_state=items["opt_state"],
                       reference=_from_pure(setup.bundle.abstract_params, reference) if reference is not None
                       else None,
                       data=extra["data"], best=Best(**extra["best"]),
                       nan_streak=int(extra["counters"]["nan_streak"]))
    return state, skipped
