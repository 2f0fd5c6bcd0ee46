import os
import signal
import time

import pytest

from environments.bfcl import catalog, prompts
from environments.bfcl.episode import Episode
from environments.bfcl.pool import (
    MAX_STARTUP_FAILURES, EnvPool, EnvRequestError, EnvStartupError, EpisodeFailed, PoolFullError,
)

MATH_ENTRY = "multi_turn_base_15"  # involves MathAPI
# 7 ** 10**9 as an int takes far longer than any step limit: a real call a model could make.
HANG = [{"name": "power", "arguments": {"base": 7, "exponent": 10**9}}]
WAIT = 60


def _replay(remote, entry, wait=WAIT):
    outputs = []
    for calls in entry.ground_truth:
        if calls:
            outputs.append(remote.step(list(calls)).result(wait))
        turn_end = remote.end_turn().result(wait)
    assert turn_end.next_messages is None
    return outputs, remote.finish().result(wait)


def _local_outputs(entry):
    episode = Episode(entry.id)
    return [episode.step(list(calls)) for calls in entry.ground_truth if calls]


def test_in_process_pool_has_the_same_interface():
    with EnvPool(0) as pool:
        entry = catalog.load_entry("multi_turn_miss_func_0")
        remote = pool.open(entry.id)
        start = remote.started.result(0)
        assert start.num_turns == entry.num_turns and start.first_messages == prompts.first_messages(entry, "t3rl")
        assert start.tools == prompts.tools(entry, "t3rl")
        outputs, result = _replay(remote, entry, wait=0)
        assert outputs == _local_outputs(entry) and result.progress == 1.0 and not result.failed
        assert pool.open_episodes == 0
        with pytest.raises(EnvRequestError, match="is not open"):
            remote.step([{"name": "ls", "arguments": {}}]).result(0)


def test_worker_results_equal_in_process_results_and_overlap():
    ids = [catalog.entry_ids(c)[i] for c in catalog.CATEGORIES for i in (0, 7, 151)]
    ids = [i for i in ids if catalog.load_entry(i).ground_truth[0]]
    with EnvPool(2, step_timeout_s=WAIT) as pool:
        remotes = [pool.open(i) for i in ids]
        held = pool.episodes_per_worker()
        assert sum(held) == len(ids) and max(held) - min(held) <= 1
        # Submit the first step of every episode before waiting on any of them.
        firsts = [r.step(list(catalog.load_entry(r.entry_id).ground_truth[0])) for r in remotes]
        for remote, first in zip(remotes, firsts):
            entry = catalog.load_entry(remote.entry_id)
            assert first.result(WAIT) == _local_outputs(entry)[0]
            remote.end_turn().result(WAIT)
            for calls in entry.ground_truth[1:]:
                if calls:
                    remote.step(list(calls))
                end = remote.end_turn()
            assert end.result(WAIT).next_messages is None
            assert remote.finish().result(WAIT).progress == 1.0
        assert pool.open_episodes == 0 and pool.restarts == 0


def test_step_timeout_replaces_worker_and_fails_its_episodes():
    with EnvPool(1, step_timeout_s=1.0) as pool:
        pool.open(MATH_ENTRY).started.result(WAIT)  # worker warm: catalog loaded
        old_pid = pool.worker_pids()[0]
        bystander = pool.open("multi_turn_base_0")
        bystander.started.result(WAIT)
        hung = pool.open(MATH_ENTRY)
        started = time.monotonic()
        with pytest.raises(EpisodeFailed, match="exceeded 1s"):
            hung.step(HANG).result(WAIT)
        assert time.monotonic() - started < 10
        result = hung.finish().result(WAIT)
        assert result.failed and result.reward == 0.0 and "exceeded" in result.failure_reason
        assert result.num_turns == catalog.load_entry(MATH_ENTRY).num_turns
        with pytest.raises(EpisodeFailed):  # its state was lost with the worker
            bystander.step([{"name": "ls", "arguments": {}}]).result(WAIT)
        assert bystander.finish().result(WAIT).failed
        assert pool.restarts == 1 and pool.worker_pids()[0] != old_pid
        entry = catalog.load_entry("multi_turn_base_3")
        _, fresh = _replay(pool.open(entry.id), entry)
        assert fresh.progress == 1.0


def test_crashed_worker_is_replaced():
    with EnvPool(1, step_timeout_s=WAIT) as pool:
        remote = pool.open("multi_turn_base_0")
        remote.started.result(WAIT)
        os.kill(pool.worker_pids()[0], signal.SIGKILL)
        with pytest.raises(EpisodeFailed, match="exited"):
            remote.step([{"name": "ls", "arguments": {}}]).result(WAIT)
        assert remote.finish().result(WAIT).failure_reason.startswith("worker process exited")
        entry = catalog.load_entry("multi_turn_base_1")
        _, result = _replay(pool.open(entry.id), entry)
        assert result.progress == 1.0 and pool.restarts == 1


def test_capacity_recycling_and_refused_requests():
    with EnvPool(1, step_timeout_s=WAIT, max_episodes_per_worker=2, recycle_after=3) as pool:
        a, b = pool.open("multi_turn_base_0"), pool.open("multi_turn_base_1")
        with pytest.raises(PoolFullError):
            pool.open("multi_turn_base_2")
        with pytest.raises(EnvRequestError, match="record_text_reply"):
            a.step([]).result(WAIT)  # refused, but the episode lives on
        assert a.step([{"name": "pwd", "arguments": {}}]).result(WAIT)
        first_pid = pool.worker_pids()[0]
        a.finish().result(WAIT)
        b.finish().result(WAIT)
        c = pool.open("multi_turn_base_2")  # third episode: the worker is due for recycling once idle
        c.finish().result(WAIT)
        deadline = time.monotonic() + WAIT
        while pool.worker_pids()[0] == first_pid and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pool.worker_pids()[0] != first_pid
        d = pool.open("multi_turn_base_4")
        assert d.started.result(WAIT).entry_id == "multi_turn_base_4"
        d.finish().result(WAIT)


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="fork"):
        EnvPool(1, start_method="fork")
    with pytest.raises(ValueError, match="num_workers"):
        EnvPool(-1)
    with EnvPool(0) as pool:
        with pytest.raises(EnvRequestError, match="multi_turn_base_999"):
            pool.open("multi_turn_base_999").started.result(0)


def test_a_lost_worker_fails_only_its_own_episodes():
    ids = ["multi_turn_base_0", "multi_turn_base_1", "multi_turn_base_3", "multi_turn_base_4"]
    with EnvPool(2, step_timeout_s=WAIT) as pool:
        remotes = [pool.open(i) for i in ids]
        for r in remotes:
            r.started.result(WAIT)
        victim_pid = pool.worker_pid_of(remotes[0])
        on_victim = [r for r in remotes if pool.worker_pid_of(r) == victim_pid]
        others = [r for r in remotes if pool.worker_pid_of(r) != victim_pid]
        assert on_victim and others  # both workers hold episodes
        os.kill(victim_pid, signal.SIGKILL)
        for r in on_victim:
            with pytest.raises(EpisodeFailed, match="exited"):
                r.step([{"name": "pwd", "arguments": {}}]).result(WAIT)
            result = r.finish().result(WAIT)
            assert result.failed and result.reward == 0.0 and result.failure_reason.startswith("worker process exited")
            assert result.entry_id == r.entry_id and result.num_turns == catalog.load_entry(r.entry_id).num_turns
        for r in others:  # untouched: same outputs as in-process, full reward
            entry = catalog.load_entry(r.entry_id)
            outputs, result = _replay(r, entry)
            assert outputs == _local_outputs(entry) and result.progress == 1.0 and not result.failed
        assert pool.restarts == 1 and pool.open_episodes == 0


def test_every_failure_path_ends_in_a_failed_result():
    for workers in (0, 1):
        with EnvPool(workers, step_timeout_s=WAIT) as pool:
            bad = pool.open("multi_turn_base_999")  # the worker refuses to open it
            with pytest.raises(EnvRequestError, match="multi_turn_base_999"):
                bad.started.result(WAIT)
            result = bad.finish().result(WAIT)
            assert result.failed and "open failed" in result.failure_reason and result.num_turns == 0
            bad_kind = pool.open("multi_turn_base_0", reward_kind="nonsense")
            result = bad_kind.finish().result(WAIT)
            assert result.failed and "nonsense" in result.failure_reason
            left_open = pool.open("multi_turn_base_1")
            left_open.started.result(WAIT)
        result = left_open.finish().result(WAIT)  # after shutdown
        assert result.failed and result.failure_reason == "pool shut down", workers


def test_unknown_prompt_style_is_refused_with_the_known_styles():
    with EnvPool(0) as pool:
        with pytest.raises(ValueError, match=r"prompt\.style.*'fancy'.*\['t3rl', 'bfcl'\]"):
            pool.open("multi_turn_base_0", prompt_style="fancy")


def test_workers_that_cannot_start_name_the_cause_and_stop_new_episodes(monkeypatch):
    # A real misconfiguration: bfcl-eval's project root under a file. Workers inherit it (spawn reads the
    # environment at start), the parent already fixed its own root at import.
    monkeypatch.setenv("BFCL_PROJECT_ROOT", "/dev/null/bfcl_root")
    with EnvPool(2, step_timeout_s=WAIT, start_method="spawn") as pool:
        with pytest.raises(EnvStartupError) as info:
            pool.wait_ready(WAIT)
        message = str(info.value)
        assert "could not start: NotADirectoryError" in message and "slot" in message and "pid" in message
        assert "worker traceback" in message and "project_root.py" in message
        with pytest.raises(EnvStartupError, match="NotADirectoryError"):
            pool.open("multi_turn_base_0")
        assert pool.restarts <= MAX_STARTUP_FAILURES


def _scripted_turns(entry) -> list[list[list]]:
    """Ground truth, damaged in fixed ways (a repeated call, an ill-typed argument, an unknown tool), in steps."""
    turns = []
    for t, calls in enumerate(entry.ground_truth):
        calls = list(calls)
        if calls and t % 2:
            calls.insert(0, calls[-1])
        if t % 3 == 1:
            calls.append({"name": "cd", "arguments": {"folder": 7}})
        if t % 3 == 2:
            calls.append({"name": "no_such_tool", "arguments": {}})
        turns.append([calls[i:i + 2] for i in range(0, len(calls), 2)])
    return turns


def _run_script(remote, turns, wait=WAIT):
    seen = [remote.started.result(wait)]
    for steps in turns:
        for step in steps:
            seen.append(remote.step(step).result(wait))
        seen.append(remote.end_turn().result(wait))
    return seen, remote.finish().result(wait)


def test_results_do_not_depend_on_worker_or_order():
    # Entries whose classes touch process-wide or shared state: MathAPI (decimal precision), long-context
    # TravelAPI (shared card data) and VehicleControl (module-level weather dict), TradingBot, file systems.
    ids = ["multi_turn_base_15", "multi_turn_long_context_3", "multi_turn_long_context_10",
           "multi_turn_base_40", "multi_turn_miss_param_20", "multi_turn_miss_func_5", "multi_turn_base_110",
           "multi_turn_long_context_150"]
    scripts = {i: _scripted_turns(catalog.load_entry(i)) for i in ids}
    with EnvPool(0) as pool:
        reference = {i: _run_script(pool.open(i, augment=True), scripts[i], wait=0) for i in ids}
    with EnvPool(3, step_timeout_s=WAIT) as pool:
        # Reverse order, twice each, all episodes in flight together on three workers.
        remotes = [(i, pool.open(i, augment=True)) for i in reversed(ids + ids)]
        for i, remote in remotes:
            assert _run_script(remote, scripts[i]) == reference[i], i
