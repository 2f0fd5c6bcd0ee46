"""The splits and score command lines, run as real subprocesses."""

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from environments.bfcl import catalog, splits
from environments.bfcl.executor import named_call

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _t3rl_reference_split() -> tuple[set, set, set]:
    # T3RL seeds the global generator with 42 and shuffles range(200) once.
    state = random.getstate()
    try:
        random.seed(42)
        ids = list(range(200))
        random.shuffle(ids)
    finally:
        random.setstate(state)
    return set(ids[:100]), set(ids[100:125]), set(ids[125:])


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("splits")
    proc = _run("environments.bfcl.splits", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def _records(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_split_files_reproduce_t3rl(split_dir):
    sizes = {name: len(_records(split_dir / name)) for name in splits.FILES}
    assert sizes == {"bfcl_train_base.jsonl": 100, "bfcl_train.jsonl": 400, "bfcl_val.jsonl": 100,
                     "bfcl_test.jsonl": 300}
    train, val, test = _t3rl_reference_split()
    expected = {"bfcl_train.jsonl": train, "bfcl_val.jsonl": val, "bfcl_test.jsonl": test,
                "bfcl_train_base.jsonl": train}
    for name, indices in expected.items():
        ids = splits.read_entry_ids(split_dir / name)
        per_category = Counter(catalog.parse_entry_id(i)[0] for i in ids)
        for category, count in per_category.items():
            assert {catalog.parse_entry_id(i)[1] for i in ids if i.startswith(f"multi_turn_{category}_")} == indices
        assert len(ids) == len(set(ids)) == len(indices) * len(per_category)
    assert set(splits.read_entry_ids(split_dir / "bfcl_train_base.jsonl")) <= set(
        splits.read_entry_ids(split_dir / "bfcl_train.jsonl"))


def test_split_records_carry_t3rl_fields(split_dir):
    record = _records(split_dir / "bfcl_val.jsonl")[30]
    meta = record["metadata"]
    assert set(meta) >= {"tools", "data_source", "split", "index", "bfcl_task"}
    task = meta["bfcl_task"]
    assert set(task) >= {"id", "initial_config", "involved_classes", "ground_truth", "question"}
    entry = catalog.load_entry(task["id"])
    assert meta["split"] == "val" and meta["index"] == entry.id and meta["data_source"] == f"multi_turn_{entry.category}"
    assert record["prompt"] == entry.turn_messages(0)
    assert task["ground_truth"] == [list(t) for t in entry.ground_truth]
    assert meta["tools"] == catalog.tool_schemas_at(entry, 0)


def test_read_entry_ids_accepts_t3rl_records_and_names_bad_lines(tmp_path):
    t3rl_style = {"prompt": [], "metadata": {"index": "multi_turn_base_5", "bfcl_task": {"id": "multi_turn_base_5"}}}
    good = tmp_path / "t3rl.jsonl"
    good.write_text(json.dumps(t3rl_style) + "\n")
    assert splits.read_entry_ids(good) == ["multi_turn_base_5"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(t3rl_style) + "\n" + json.dumps({"prompt": []}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        splits.read_entry_ids(bad)


def test_score_cli(tmp_path):
    base = catalog.load_entry("multi_turn_base_2")
    miss = catalog.load_entry("multi_turn_miss_param_0")
    as_objects = [[named_call(c) for c in turn] for turn in miss.ground_truth]
    damaged = [list(t) for t in base.ground_truth]
    damaged[1] = damaged[1][:-1]
    lines = [
        {"id": base.id, "turns": [list(t) for t in base.ground_truth]},
        {"id": miss.id, "turns": [[[c] for c in turn] for turn in as_objects]},  # one call per step
        {"id": base.id, "turns": damaged},
        {"id": base.id, "turns": [list(t) for t in base.ground_truth[:2]]},  # stopped early
    ]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    proc = _run("environments.bfcl.score", "--input", str(src), "--output", str(dst))
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [o["progress"] for o in out[:2]] == [1.0, 1.0]
    assert out[2]["turn_correct"][1] is False and out[2]["progress"] < 1.0
    assert out[3]["turn_correct"][2:] == [False] * (base.num_turns - 2)
    assert "miss_param" in proc.stdout and "all" in proc.stdout


def test_score_cli_names_the_bad_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "multi_turn_base_0", "turns": []}) + "\n"
                   + json.dumps({"id": "multi_turn_nope_1", "turns": []}) + "\n")
    proc = _run("environments.bfcl.score", "--input", str(src))
    assert proc.returncode == 2 and "in.jsonl:2" in proc.stderr and "multi_turn_nope_1" in proc.stderr
