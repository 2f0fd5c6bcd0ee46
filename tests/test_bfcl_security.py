"""Crafted calls execute nothing, create no file and come back as error results."""

import builtins
import os

import pytest

from environments.bfcl import catalog
from environments.bfcl.episode import Episode
from environments.bfcl.executor import BAD_ARGUMENTS, BAD_CALL, EXCEPTION, UNKNOWN_TOOL, ToolEnvironment

ENTRY = "multi_turn_base_15"  # GorillaFileSystem + MathAPI


def _nested(depth):
    value = "x"
    for _ in range(depth):
        value = [value]
    return value


def _crafted_objects(marker: str) -> list[tuple[dict, str]]:
    shell = f"__import__('os').system('touch {marker}')"
    return [
        ({"name": shell, "arguments": {}}, UNKNOWN_TOOL),
        ({"name": "exec", "arguments": {"source": f"open('{marker}', 'w')"}}, UNKNOWN_TOOL),
        ({"name": "eval", "arguments": {"source": shell}}, UNKNOWN_TOOL),
        ({"name": "len", "arguments": {"obj": [1]}}, UNKNOWN_TOOL),
        ({"name": "open", "arguments": {"file": marker, "mode": "w"}}, UNKNOWN_TOOL),
        ({"name": "__import__", "arguments": {"name": "os"}}, UNKNOWN_TOOL),
        ({"name": "GorillaFileSystem.__init__", "arguments": {}}, UNKNOWN_TOOL),
        ({"name": "ls.__globals__", "arguments": {}}, UNKNOWN_TOOL),
        ({"name": "_load_scenario", "arguments": {"scenario": {}}}, UNKNOWN_TOOL),
        ({"name": "__class__", "arguments": {}}, UNKNOWN_TOOL),
        ({"name": "x" * 1_000_000, "arguments": {}}, UNKNOWN_TOOL),
        ({"name": "cd", "arguments": {"folder": "a" * 1_000_000}}, BAD_ARGUMENTS),
        ({"name": "cd", "arguments": {"folder": _nested(100_000)}}, BAD_ARGUMENTS),
        ({"name": "cd", "arguments": {"__class__": "x"}}, EXCEPTION),  # runs into Python's TypeError, as in bfcl
        ({"name": "mean", "arguments": {"numbers": _nested(50)}}, BAD_ARGUMENTS),
        ({"name": "cd", "arguments": "folder='x'"}, BAD_CALL),
        ({"name": None, "arguments": {}}, BAD_CALL),
        ("not even an object", BAD_CALL),
    ]


def _crafted_strings(marker: str) -> list[str]:
    shell = f"__import__('os').system('touch {marker}')"
    return [
        shell,
        f"cd(folder={shell})",
        f"exec(\"open('{marker}', 'w')\")",
        "eval('1+1')",
        "len([1, 2])",
        "ls.__globals__['__builtins__']['exec']('x=1')",
        "GorillaFileSystem.__init__()",
        "cd(**{'folder': 'x'})",
        "cd(folder='a'); __import__('os')",
        "cd(folder=[i for i in range(3)])",
        "lambda: 0",
        "cd(" * 100_000 + ")" * 100_000,
        "cd(folder='" + "a" * 200_000 + "')",
    ]


@pytest.fixture
def no_eval(monkeypatch):
    """Trip wire: any use of eval/exec while the executor runs fails the test."""
    # Import everything first: the import machinery itself uses exec.
    Episode(ENTRY, augment=True).step([{"name": "nope", "arguments": {}}])
    ToolEnvironment(catalog.CLASS_NAMES, {}, False)

    def forbidden(*args, **kwargs):
        raise AssertionError("eval/exec was called")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)


def test_crafted_calls_run_nothing(tmp_path, monkeypatch, no_eval):
    monkeypatch.chdir(tmp_path)
    marker = str(tmp_path / "pwned")
    entry = catalog.load_entry(ENTRY)
    env = ToolEnvironment.for_entry(entry)
    before = env.snapshot()
    for call, kind in _crafted_objects(marker):
        outcome = env.execute(call)
        assert outcome.kind == kind, (str(call)[:80], outcome.kind)
        assert outcome.result.startswith("Error during execution: ") and len(outcome.result) < 500
    for text in _crafted_strings(marker):
        outcome = env.execute(text)
        assert outcome.kind in (BAD_CALL, UNKNOWN_TOOL, BAD_ARGUMENTS), (text[:80], outcome.kind)
        assert outcome.result.startswith("Error during execution: ")
    assert env.snapshot() == before  # nothing touched the environment either
    assert os.listdir(tmp_path) == []


def test_code_in_argument_values_is_just_data(tmp_path, monkeypatch, no_eval):
    monkeypatch.chdir(tmp_path)
    payload = f"__import__('os').system('touch {tmp_path / 'pwned'}')"
    episode = Episode(ENTRY, augment=True)
    results = episode.step([{"name": "touch", "arguments": {"file_name": "notes.txt"}},
                            {"name": "echo", "arguments": {"content": payload, "file_name": "notes.txt"}},
                            {"name": "cat", "arguments": {"file_name": "notes.txt"}}])
    assert payload in results[2]
    assert os.listdir(tmp_path) == []


def test_episode_turns_crafted_calls_into_results_not_exceptions(no_eval):
    episode = Episode(ENTRY, augment=True)
    calls = [c for c, _ in _crafted_objects("/nonexistent/pwned")] + _crafted_strings("/nonexistent/pwned")
    results = episode.step(calls)
    assert len(results) == len(calls)
    assert all(r.startswith("Error during execution: ") for r in results)
    # EnvTuning's format reward: the reply parsed (1) but none of its calls ran cleanly (+0).
    assert episode.format_score == 1.0
