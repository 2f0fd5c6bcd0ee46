"""Episodes never share state: in one process, across worker processes, and across repeated runs."""

import json

from environments.bfcl import catalog
from environments.bfcl.episode import Episode
from environments.bfcl.executor import ToolEnvironment
from environments.bfcl.pool import EnvPool

LONG_TRAVEL = "multi_turn_long_context_151"  # TravelAPI in long-context mode, token 'abc123xyz'
EXTENSION_CARD = "1234567812345678"  # a card bfcl-eval splices in from module-level data (balance 5000.0)
BOOK = {"name": "book_flight", "arguments": {
    "access_token": "abc123xyz", "card_id": EXTENSION_CARD, "travel_date": "2026-11-10",
    "travel_from": "SFO", "travel_to": "LAX", "travel_class": "economy"}}
BALANCE = {"name": "get_credit_card_balance", "arguments": {"access_token": "abc123xyz", "card_id": EXTENSION_CARD}}


def _balance(result: str) -> float:
    return json.loads(result)["card_balance"]


def test_sixteen_interleaved_file_system_episodes_are_independent():
    episodes = [Episode("multi_turn_base_0") for _ in range(16)]
    for i, episode in enumerate(episodes):
        episode.step([{"name": "touch", "arguments": {"file_name": f"mine_{i}.txt"}}])
    for i, episode in enumerate(reversed(episodes)):
        episode.step([{"name": "echo", "arguments": {"content": f"written by {15 - i}",
                                                     "file_name": f"mine_{15 - i}.txt"}}])
    for i, episode in enumerate(episodes):
        listing = json.loads(episode.step([{"name": "ls", "arguments": {}}])[0])["current_directory_content"]
        assert [n for n in listing if n.startswith("mine_")] == [f"mine_{i}.txt"]
        assert episode.step([{"name": "cat", "arguments": {"file_name": f"mine_{i}.txt"}}])[0] == json.dumps(
            {"file_content": f"written by {i}"})


def test_long_context_travel_balance_is_not_shared_in_process():
    episodes = [Episode(LONG_TRAVEL) for _ in range(16)]
    start = _balance(episodes[0].step([BALANCE])[0])
    assert start == 5000.0
    for i, episode in enumerate(episodes):
        if i % 2:
            assert json.loads(episode.step([BOOK])[0])["booking_status"] is True
    for i, episode in enumerate(episodes):
        balance = _balance(episode.step([BALANCE])[0])
        assert (balance < start) if i % 2 else (balance == start), (i, balance)
    # A brand-new episode still starts from the pristine balance.
    assert _balance(Episode(LONG_TRAVEL).step([BALANCE])[0]) == start


def test_long_context_travel_balance_is_not_shared_across_processes():
    books = [i % 3 == 1 for i in range(16)]  # episodes alternate between workers: each holds both kinds
    with EnvPool(2, step_timeout_s=60) as pool:
        episodes = [pool.open(LONG_TRAVEL) for _ in range(16)]
        booked = [e.step([BOOK]) for e, b in zip(episodes, books) if b]
        assert all(json.loads(f.result(timeout=60)[0])["booking_status"] for f in booked)
        balances = [_balance(e.step([BALANCE]).result(timeout=60)[0]) for e in episodes]
        for e in episodes:
            e.finish().result(timeout=60)
    assert [b == 5000.0 for b in balances] == [not b for b in books]
    assert len({b for b, booked in zip(balances, books) if booked}) == 1  # each booking charged once


def _all_ground_truth_results() -> list[str]:
    results = []
    for entry_id in catalog.all_entry_ids():
        entry = catalog.load_entry(entry_id)
        env = ToolEnvironment.for_entry(entry)
        results.extend(env.execute(call).result for calls in entry.ground_truth for call in calls)
        results.append(repr(env.public_state()))
    return results


def test_replaying_everything_twice_gives_identical_results():
    # Any state leaking through module-level data would make the second pass differ from the first.
    assert _all_ground_truth_results() == _all_ground_truth_results()
