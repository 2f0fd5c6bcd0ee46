"""Score recorded trajectories with the environment's per-turn correctness.

    python -m environments.bfcl.score --input F.jsonl [--output G.jsonl]

Each input line: {"id": "multi_turn_base_3", "turns": [[call, ...], ...]}, one list of calls per user turn (or a
list of steps, each a list of calls). A call is a BFCL call string such as "cd(folder='x')" (parsed with `ast`,
never evaluated) or {"name": ..., "arguments": {...}}. Turns missing at the end count as incorrect.
Output lines: {"id", "turn_correct": [...], "progress": float}; a per-category summary is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

from environments.bfcl import catalog
from environments.bfcl.episode import Episode


def _steps(turn, where: str) -> list[list]:
    if not isinstance(turn, list):
        raise ValueError(f"{where}: a turn must be a list of calls, got {type(turn).__name__}")
    if turn and all(isinstance(step, list) for step in turn):
        return [step for step in turn if step]
    if any(isinstance(step, list) for step in turn):
        raise ValueError(f"{where}: a turn mixes steps (lists) and calls")
    return [turn] if turn else []


def score_trajectory(entry_id: str, turns: list, where: str = "trajectory") -> dict:
    try:
        episode = Episode(entry_id)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if not isinstance(turns, list):
        raise ValueError(f"{where}: 'turns' must be a list")
    if len(turns) > episode.num_turns:
        raise ValueError(f"{where}: {len(turns)} turns given but {entry_id} has {episode.num_turns}")
    for t, turn in enumerate(turns):
        for step in _steps(turn, f"{where}, turn {t}"):
            episode.step(step)
        episode.end_turn()
    while not episode.done:
        episode.end_turn(cut_off=True)
    return {"id": entry_id, "turn_correct": episode.turn_correct, "progress": episode.progress}


def score_file(input_path: str) -> list[dict]:
    scored = []
    with open(input_path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{input_path}:{n}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e})") from None
            if not isinstance(item, dict) or "id" not in item or "turns" not in item:
                raise ValueError(f"{where}: expected an object with 'id' and 'turns'")
            scored.append(score_trajectory(item["id"], item["turns"], where))
    return scored


def summary(scored: list[dict]) -> dict[str, dict[str, float]]:
    by_category = defaultdict(list)
    for s in scored:
        by_category[catalog.parse_entry_id(s["id"])[0]].append(s)
    table = {}
    for category in [c for c in catalog.CATEGORIES if c in by_category] + (["all"] if scored else []):
        rows = scored if category == "all" else by_category[category]
        turns = [c for r in rows for c in r["turn_correct"]]
        table[category] = {
            "entries": len(rows),
            "progress": sum(r["progress"] for r in rows) / len(rows),
            "accuracy": sum(all(r["turn_correct"]) for r in rows) / len(rows),
            "turn_accuracy": sum(turns) / len(turns),
        }
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    try:
        scored = score_file(args.input)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            for s in scored:
                f.write(json.dumps(s) + "\n")
    print(f"{'category':<14}{'entries':>8}{'progress':>10}{'accuracy':>10}{'turn_acc':>10}")
    for category, row in summary(scored).items():
        print(f"{category:<14}{row['entries']:>8}{row['progress']:>10.4f}{row['accuracy']:>10.4f}"
              f"{row['turn_accuracy']:>10.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
