"""Training prompts: T3RL split files -> deterministic, checkpointable batches of records.

    records = load_split("data/splits/bfcl_train.jsonl", categories=("base",), max_entries=0)
    prompts = PromptIterator(records, prompts_per_step=32, seed=cfg.seed)
    batch = next(prompts)                    # list of 32 records
    extra["data"] = prompts.get_state()      # JSON-able, goes into the checkpoint
    ...
    prompts.set_state(extra["data"])         # after a restore: continues with exactly the next batch

A record is one line of a split file written by `python -m environments.bfcl.splits --out DIR`:
`{"prompt": [messages], "metadata": {"tools", "data_source", "split", "index", "bfcl_task": {"id", ...}}}`.

The iterator is grain's: `MapDataset.source(records).shuffle(seed).repeat()` reshuffles every epoch with a
seed derived from (seed, epoch), and `.batch(prompts_per_step)` cuts the endless stream into steps (a batch may
span an epoch boundary, so every record is seen once per epoch). Its state is grain's `{"next_index": i}` plus
what must match for that index to mean the same thing (record count, ids digest, batch size, seed, shuffle);
`set_state` refuses a state from another split or setting instead of silently replaying other data.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import grain

from environments.bfcl.catalog import CATEGORIES, parse_entry_id

__all__ = ["PromptIterator", "entry_id", "load_split"]

SPLITS_COMMAND = "python -m environments.bfcl.splits --out DIR"
_EPOCHS = 1_000_000


def entry_id(record: dict) -> str:
    """The BFCL entry id of a split record (`metadata.bfcl_task.id`, else T3RL's `metadata.index`)."""
    meta = record["metadata"]
    task = meta.get("bfcl_task") or {}
    return task.get("id") or meta["index"]


def _parse_line(path: str, n: int, line: str) -> dict:
    try:
        record = json.loads(line)
        if not isinstance(record.get("prompt"), list):
            raise KeyError("prompt")
        parse_entry_id(entry_id(record))
    except json.JSONDecodeError:
        raise ValueError(f"{path}:{n}: not a JSON line") from None
    except (KeyError, TypeError, AttributeError):
        raise ValueError(f"{path}:{n}: not a split record (needs a 'prompt' list and metadata.bfcl_task.id); "
                         f"write split files with `{SPLITS_COMMAND}`") from None
    return record


def load_split(path: str | os.PathLike, *, max_entries: int = 0, categories: Sequence[str] = (),
               max_prompt_tokens: int | None = None,
               prompt_tokens_fn: Callable[[dict], int] | None = None) -> list[dict[str, Any]]:
    """Records of a split file in file order, filtered by category, then prompt length, then cut to max_entries.

    `categories=()` keeps all; `max_entries=0` keeps all; `max_prompt_tokens` drops records whose
    `prompt_tokens_fn(record)` (supplied by the caller, e.g. the chat template with tools) exceeds it.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"split file {path} does not exist; create the split files with `{SPLITS_COMMAND}` "
            f"(DIR = the config's data.splits_dir, here {os.path.dirname(path) or '.'})")
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise ValueError(f"unknown categories {unknown}; expected some of {list(CATEGORIES)}")
    if max_entries < 0:
        raise ValueError(f"max_entries must be >= 0 (0 = all), got {max_entries}")
    if max_prompt_tokens is not None and prompt_tokens_fn is None:
        raise ValueError("max_prompt_tokens needs prompt_tokens_fn to measure each prompt")
    with open(path, encoding="utf-8") as f:
        records = [_parse_line(path, n, line) for n, line in enumerate(f, 1) if line.strip()]
    total = len(records)
    if categories:
        records = [r for r in records if parse_entry_id(entry_id(r))[0] in categories]
    if max_prompt_tokens is not None:
        records = [r for r in records if prompt_tokens_fn(r) <= max_prompt_tokens]
    if max_entries:
        records = records[:max_entries]
    if not records:
        raise ValueError(f"no records left from {path} ({total} in the file) after filtering by "
                         f"categories={list(categories) or 'all'}, max_prompt_tokens={max_prompt_tokens}")
    return records


def _ids_digest(records: Sequence[dict]) -> str:
    return hashlib.sha256("\n".join(entry_id(r) for r in records).encode()).hexdigest()[:16]


class PromptIterator:
    """Endless seeded epochs of `records`, `prompts_per_step` at a time; see the module docstring."""

    def __init__(self, records: Sequence[dict], *, prompts_per_step: int, seed: int, shuffle: bool = True):
        if not records:
            raise ValueError("PromptIterator needs at least one record")
        if prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be >= 1, got {prompts_per_step}")
        self._identity = {
            "num_records": len(records),
            "ids_digest": _ids_digest(records),
            "prompts_per_step": prompts_per_step,
            "seed": seed,
            "shuffle": shuffle,
        }
        self.prompts_per_step = prompts_per_step
        self.num_records = len(records)
        dataset = grain.MapDataset.source(list(records))
        if shuffle:
            dataset = dataset.shuffle(seed=seed)
        # list batches: records are nested dicts that must not be stacked into arrays.
        # A finite but practically endless repeat: grain's iterator takes len() of the dataset, and repeat(None)
        # reports sys.maxsize, which overflows there whenever the batch size is 1.
        batches = dataset.repeat(_EPOCHS, reseed_each_epoch=True).batch(prompts_per_step, batch_fn=list)
        # In-memory records need no reader threads; grain's default prefetch pool only costs start-up time.
        self._dataset = batches.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        self._iterator = iter(self._dataset)

    def __iter__(self):
        return self

    def __next__(self) -> list[dict[str, Any]]:
        return next(self._iterator)

    @property
    def steps_taken(self) -> int:
        """Batches handed out so far (counting those before a restored state)."""
        return int(self._iterator.get_state()["next_index"])

    @property
    def epoch(self) -> float:
        """Epochs consumed so far, fractional."""
        return self.steps_taken * self.prompts_per_step / self.num_records

    def get_state(self) -> dict[str, Any]:
        return {"grain": self._iterator.get_state(), **self._identity}

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "grain" not in state:
            raise ValueError(f"not a PromptIterator state: {state!r}")
        for key, value in self._identity.items():
            if state.get(key) != value:
                raise ValueError(f"data iterator state from another setup: {key} is {state.get(key)!r} in the "
                                 f"checkpoint but {value!r} now (changed split, filters, batch size or seed?)")
        self._iterator.set_state(state["grain"])
