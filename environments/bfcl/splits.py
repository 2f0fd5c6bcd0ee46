"""T3RL's train/val/test split of the BFCL multi-turn entries, written as T3RL-format JSONL files.

    python -m environments.bfcl.splits --out DIR

The split: numeric ids 0..199 shuffled once with seed 42 (Python's `random`), the same order for every
category; the first 100 go to train, the next 25 to val, the last 75 to test. Files, in T3RL's record layout
(`prompt`, `metadata{tools, data_source, split, index, bfcl_task{...}}`):
    bfcl_train_base.jsonl  100 base train entries      bfcl_val.jsonl   100 (25 per category)
    bfcl_train.jsonl       400 (100 per category)      bfcl_test.jsonl  300 (75 per category)
`prompt` holds the first turn's user messages only: the tools go through the chat template's <tools> block.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from environments.bfcl import catalog

SEED = 42
NUM_IDS = 200
TRAIN, VAL = 100, 25  # the remaining 75 ids are test
FILES = {
    "bfcl_train_base.jsonl": ("train", ("base",)),
    "bfcl_train.jsonl": ("train", catalog.CATEGORIES),
    "bfcl_val.jsonl": ("val", catalog.CATEGORIES),
    "bfcl_test.jsonl": ("test", catalog.CATEGORIES),
}


def split_of_index() -> dict[int, str]:
    """Numeric entry index -> "train" | "val" | "test"."""
    order = list(range(NUM_IDS))
    random.Random(SEED).shuffle(order)
    return {i: ("train" if n < TRAIN else "val" if n < TRAIN + VAL else "test") for n, i in enumerate(order)}


def split_entry_ids(split: str, categories=catalog.CATEGORIES) -> list[str]:
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}; expected train, val or test")
    splits = split_of_index()
    return [i for c in categories for i in catalog.entry_ids(c) if splits[catalog.parse_entry_id(i)[1]] == split]


def record(entry_id: str, split: str) -> dict:
    entry = catalog.load_entry(entry_id)
    task = catalog.entry_record(entry)
    task["split"] = split
    return {
        "prompt": entry.turn_messages(0),
        "metadata": {
            "tools": catalog.tool_schemas_at(entry, 0),
            "data_source": f"multi_turn_{entry.category}",
            "ability": "multi_turn_function_calling",
            "split": split,
            "index": entry.id,
            "bfcl_task": task,
        },
    }


def write_splits(out_dir: str | Path) -> dict[str, int]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, (split, categories) in FILES.items():
        ids = split_entry_ids(split, categories)
        with open(out / name, "w", encoding="utf-8") as f:
            for entry_id in ids:
                f.write(json.dumps(record(entry_id, split), ensure_ascii=False) + "\n")
        counts[name] = len(ids)
    return counts


def read_entry_ids(path: str | Path) -> list[str]:
    """Entry ids of a split file, ours or T3RL's (`metadata.bfcl_task.id`, else `metadata.index`)."""
    ids = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                meta = json.loads(line)["metadata"]
                entry_id = meta.get("bfcl_task", {}).get("id") or meta["index"]
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise ValueError(f"{path}:{n}: not a split record with metadata.bfcl_task.id") from None
            catalog.parse_entry_id(entry_id)
            ids.append(entry_id)
    return ids


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    for name, n in write_splits(args.out).items():
        print(f"{name}: {n} entries")


if __name__ == "__main__":
    main()
