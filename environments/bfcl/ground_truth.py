"""The ground-truth replay of an entry: per turn, its results and the public state after it.

The replay depends only on the entry, so it is computed once per process and shared by every episode of that
entry (GRPO samples one prompt many times). Snapshots are deep copies and never handed out for mutation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from environments.bfcl import catalog
from environments.bfcl.executor import ToolEnvironment

TRACE_CACHE_SIZE = 128  # GRPO steps sample ~32 prompts, each many times


@dataclass(frozen=True)
class GroundTruthTurn:
    results: tuple[str, ...]
    # Public attributes per class after the turn; None for turns with empty ground truth (never state-checked).
    state: dict[str, dict[str, Any]] | None


@functools.lru_cache(maxsize=TRACE_CACHE_SIZE)
def ground_truth_trace(entry_id: str) -> tuple[GroundTruthTurn, ...]:
    entry = catalog.load_entry(entry_id)
    env = ToolEnvironment.for_entry(entry)
    turns = []
    for calls in entry.ground_truth:
        results = tuple(env.execute(c).result for c in calls)
        turns.append(GroundTruthTurn(results, env.snapshot() if calls else None))
    return tuple(turns)
