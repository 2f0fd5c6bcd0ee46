import random

import numpy as np
import pytest

from environments.bfcl import catalog, reward
from environments.bfcl.episode import Episode, EpisodeStateError

from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import _is_subsequence_unordered


def test_responses_contained_matches_bfcl_multiset_rule():
    rng = random.Random(0)
    alphabet = ["a", "b", "c", '{"x": 1}']
    for _ in range(3000):
        expected = [rng.choice(alphabet) for _ in range(rng.randint(0, 4))]
        produced = [rng.choice(alphabet) for _ in range(rng.randint(0, 6))]
        assert reward.responses_contained(expected, produced) == _is_subsequence_unordered(expected, produced)[0]


def test_progress_and_binary_against_numpy():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 8))
        done = int(rng.integers(0, n + 1))
        correct = rng.random(done) < 0.6
        assert reward.progress_reward(list(correct), n) == pytest.approx(np.sum(correct) / n)
        assert reward.binary_reward(list(correct), n) == float(done == n and bool(np.all(correct)))
    with pytest.raises(ValueError, match="num_turns"):
        reward.progress_reward([], 0)


def test_turn_rules():
    assert reward.turn_is_correct(ground_truth_empty=True, calls_in_turn=0, cut_off=False, state_ok=None,
                                  responses_ok=None)
    assert not reward.turn_is_correct(ground_truth_empty=True, calls_in_turn=1, cut_off=False, state_ok=None,
                                      responses_ok=None)
    assert not reward.turn_is_correct(ground_truth_empty=True, calls_in_turn=0, cut_off=True, state_ok=None,
                                      responses_ok=None)
    assert not reward.turn_is_correct(ground_truth_empty=False, calls_in_turn=0, cut_off=False, state_ok=True,
                                      responses_ok=True)
    assert reward.turn_is_correct(ground_truth_empty=False, calls_in_turn=2, cut_off=False, state_ok=True,
                                  responses_ok=True)
    assert not reward.turn_is_correct(ground_truth_empty=False, calls_in_turn=2, cut_off=True, state_ok=True,
                                      responses_ok=True)
    with pytest.raises(ValueError, match="bogus"):
        reward.select_reward("bogus", progress=1, binary=1, format_score=1)


def _replay(episode: Episode) -> None:
    for calls in episode.entry.ground_truth:
        if calls:
            episode.step(list(calls))
        episode.record_text_reply()
        episode.end_turn()


def test_ground_truth_replay_scores_one_on_all_800_entries():
    for entry_id in catalog.all_entry_ids():
        episode = Episode(entry_id)
        _replay(episode)
        assert episode.done and episode.progress == 1.0 and episode.binary == 1.0, entry_id


def test_empty_ground_truth_turns_count_both_ways():
    entry = catalog.load_entry("multi_turn_miss_param_0")
    empty = [t for t, calls in enumerate(entry.ground_truth) if not calls]
    assert empty == [3]
    for act in (False, True):
        episode = Episode(entry.id)
        for t, calls in enumerate(entry.ground_truth):
            if calls:
                episode.step(list(calls))
            elif act:
                episode.step([{"name": "pwd", "arguments": {}}])  # acting instead of asking for what is missing
            episode.end_turn()
        assert episode.turn_correct == [True, True, True, not act, True]
        assert episode.progress == (1.0 if not act else 0.8)


def test_cut_off_and_unreached_turns_count_as_incorrect():
    episode = Episode("multi_turn_base_0")
    gt = episode.entry.ground_truth
    episode.step(list(gt[0]))
    episode.end_turn(cut_off=True)
    episode.step(list(gt[1]))
    episode.end_turn()
    assert episode.turn_correct == [False, True]
    assert episode.progress == pytest.approx(1 / 4)
    assert episode.binary == 0.0
    result = episode.result()
    assert result.cut_off_turns == (0,) and result.turn_correct == (False, True)


def test_format_reward_is_envtunings_stage1_reward():
    # EnvTuning: is_tool_call * (parsed replies / replies + clean tool-call replies / tool-call replies).
    episode = Episode("multi_turn_base_0", reward_kind="format")
    episode.step([{"name": "ls", "arguments": {}}])  # ran without error
    episode.step([{"name": "ls", "arguments": {}}, {"name": "nope", "arguments": {}}])  # one call errs
    episode.record_format_error("unterminated JSON")
    episode.record_text_reply()  # the answer is a round too
    assert episode.format_score == pytest.approx(3 / 4 + 1 / 2)
    assert episode.reward == episode.format_score
    assert reward.format_reward([reward.TOOLS_OK, reward.ANSWER]) == 2.0  # the maximum
    # Never calling a tool earns nothing, however clean the text.
    silent = Episode("multi_turn_base_0", reward_kind="format")
    silent.record_text_reply()
    assert silent.format_score == 0.0
    assert reward.format_reward([reward.FORMAT_ERROR, reward.ANSWER]) == 0.0
    with pytest.raises(ValueError, match="reply classes"):
        reward.format_reward(["ok"])


def test_reward_selection():
    assert Episode("multi_turn_base_0", reward_kind="binary").reward == 0.0
    with pytest.raises(ValueError, match="reward kind"):
        Episode("multi_turn_base_0", reward_kind="accuracy")


def test_failed_episode_scores_zero_and_refuses_steps():
    episode = Episode("multi_turn_base_0")
    _replay(episode)
    assert episode.progress == 1.0
    episode.fail("worker crashed")
    assert (episode.progress, episode.binary, episode.format_score, episode.reward) == (0, 0, 0, 0)
    assert episode.result().failure_reason == "worker crashed"
    with pytest.raises(EpisodeStateError, match="over"):
        episode.step([{"name": "ls", "arguments": {}}])


def test_step_requires_calls():
    episode = Episode("multi_turn_base_0")
    with pytest.raises(ValueError, match="record_text_reply"):
        episode.step([])


def test_miss_func_reveal_turn_reveals_the_tool_in_its_message():
    episode = Episode("multi_turn_miss_func_0")
    assert "sort" not in [t["function"]["name"] for t in episode.tools]
    messages = None
    for _ in range(3):
        messages = episode.end_turn()
    assert len(messages) == 1 and messages[0]["content"].endswith("\n" + catalog.ADDED_FUNCTIONS_MESSAGE)
    assert '"name": "sort"' in messages[0]["content"]
    assert [t["function"]["name"] for t in episode.revealed_tools] == ["sort"]
    # T3RL keeps the tool list of the first turn: the revealed doc reaches the model through the message.
    assert "sort" not in [t["function"]["name"] for t in episode.tools]
    # The revealed tool runs (the class method answers, not the executor's unknown-name error).
    result = episode.step([{"name": "sort", "arguments": {"file_name": "x.txt"}}])[0]
    assert "not defined" not in result and "x.txt" in result
