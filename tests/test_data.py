import json

import pytest

from environments.bfcl import splits
from t3rl_jax.data import PromptIterator, entry_id, load_split

IDS = [f"multi_turn_base_{i}" for i in range(6)] + [f"multi_turn_miss_param_{i}" for i in range(4)]


@pytest.fixture(scope="module")
def split_file(tmp_path_factory):
    """A small split file in the real layout, written record by record by environments.bfcl.splits."""
    path = tmp_path_factory.mktemp("splits") / "bfcl_train.jsonl"
    with open(path, "w") as f:
        for i in IDS:
            f.write(json.dumps(splits.record(i, "train")) + "\n")
    return path


def ids(batch):
    return [entry_id(r) for r in batch]


def test_load_split_filters_in_order(split_file):
    assert [entry_id(r) for r in load_split(split_file)] == IDS
    assert [entry_id(r) for r in load_split(split_file, categories=("miss_param",))] == IDS[6:]
    assert [entry_id(r) for r in load_split(split_file, max_entries=3)] == IDS[:3]
    lengths = {entry_id(r): len(json.dumps(r["prompt"])) for r in load_split(split_file)}
    limit = sorted(lengths.values())[4]
    kept = load_split(split_file, max_prompt_tokens=limit, prompt_tokens_fn=lambda r: len(json.dumps(r["prompt"])))
    assert [entry_id(r) for r in kept] == [i for i in IDS if lengths[i] <= limit]


def test_load_split_errors_name_the_problem(split_file, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"bfcl_val.jsonl does not exist.*python -m environments.bfcl.splits"):
        load_split(tmp_path / "bfcl_val.jsonl")
    with pytest.raises(ValueError, match=r"unknown categories \['basic'\]"):
        load_split(split_file, categories=("basic",))
    with pytest.raises(ValueError, match="needs prompt_tokens_fn"):
        load_split(split_file, max_prompt_tokens=100)
    with pytest.raises(ValueError, match=r"no records left .*10 in the file"):
        load_split(split_file, categories=("long_context",))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(splits.record(IDS[0], "train")) + "\n{\"prompt\": []}\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a split record"):
        load_split(bad)
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not a JSON line"):
        load_split(bad)


def test_iterator_is_deterministic_and_covers_each_epoch(split_file):
    records = load_split(split_file)
    first = [ids(next(PromptIterator(records, prompts_per_step=5, seed=7))) for _ in range(2)]
    assert first[0] == first[1]
    it = PromptIterator(records, prompts_per_step=5, seed=7)
    epochs = [sum((ids(next(it)) for _ in range(2)), []) for _ in range(3)]
    assert all(sorted(e) == sorted(IDS) for e in epochs)
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    assert it.epoch == 3.0
    other_seed = PromptIterator(records, prompts_per_step=5, seed=8)
    assert sum((ids(next(other_seed)) for _ in range(2)), []) != epochs[0]
    in_order = PromptIterator(records, prompts_per_step=4, seed=7, shuffle=False)
    assert [ids(next(in_order)) for _ in range(3)] == [IDS[:4], IDS[4:8], IDS[8:] + IDS[:2]]


def test_state_round_trip_continues_exactly_across_epoch_boundary(split_file):
    records = load_split(split_file)
    reference = PromptIterator(records, prompts_per_step=3, seed=1)
    expected = [ids(next(reference)) for _ in range(8)]

    run = PromptIterator(records, prompts_per_step=3, seed=1)
    for _ in range(3):  # 9 of 10 records: the next batch spans the epoch boundary
        next(run)
    state = json.loads(json.dumps(run.get_state()))  # it travels through the checkpoint's JSON
    resumed = PromptIterator(records, prompts_per_step=3, seed=1)
    resumed.set_state(state)
    assert resumed.steps_taken == 3
    assert [ids(next(resumed)) for _ in range(5)] == expected[3:]


def test_state_from_another_setup_is_refused(split_file):
    records = load_split(split_file)
    state = PromptIterator(records, prompts_per_step=3, seed=1).get_state()
    with pytest.raises(ValueError, match="seed is 1 in the checkpoint but 2 now"):
        PromptIterator(records, prompts_per_step=3, seed=2).set_state(state)
    with pytest.raises(ValueError, match="num_records is 10 in the checkpoint but 9 now"):
        PromptIterator(records[:9], prompts_per_step=3, seed=1).set_state(state)
    with pytest.raises(ValueError, match="ids_digest"):
        PromptIterator(records[::-1], prompts_per_step=3, seed=1).set_state(state)
    with pytest.raises(ValueError, match="not a PromptIterator state"):
        PromptIterator(records, prompts_per_step=3, seed=1).set_state({"next_index": 3})
    with pytest.raises(ValueError, match="prompts_per_step must be >= 1"):
        PromptIterator(records, prompts_per_step=0, seed=1)


def test_single_prompt_batches_do_not_overflow():
    records = [{"metadata": {"bfcl_task": {"id": f"multi_turn_base_{i}"}}} for i in range(3)]
    it = PromptIterator(records, prompts_per_step=1, seed=0)
    seen = [entry_id(next(it)[0]) for _ in range(6)]
    assert sorted(seen[:3]) == sorted(seen[3:]) == [f"multi_turn_base_{i}" for i in range(3)]
