"""Experience collection: request seeds, zero-variance filter with refill to `prompts_per_step`, failed episodes.

The rollout here is a function of the request alone (reward from the entry id and sample index), standing in for
the driver so the filter and refill rules can be checked on exact counts; the driver itself is tested in
tests/test_driver.py and end to end in tests/test_trainer.py.
"""

import itertools

import numpy as np
import pytest

from configs.base import recipe
from t3rl_jax.rl import experience
from t3rl_jax.rl.batch_builder import advantages_of, build
from t3rl_jax.rl.experience import collect, episode_seed, requests_for
from t3rl_jax.rollout.trajectory import Trajectory


def _cfg(**algo):
    c = recipe()
    c.data.prompts_per_step = 4
    c.rollout.samples_per_prompt = 4
    c.train.max_seq_len = 64
    c.train.micro_batch_size = 2
    c.algo.filter_zero_variance = True
    c.algo.refill_groups = True
    for k, v in algo.items():
        c.algo[k] = v
    return c


def _prompts(start=0):
    """Endless batches of 4 base-category records, numbered from `start`."""
    for b in itertools.count():
        yield [{"metadata": {"bfcl_task": {"id": f"multi_turn_base_{start + 4 * b + i}"}}} for i in range(4)]


def _rollout(varied_every: int, failed=()):
    """Episodes whose group has reward variance only for entry numbers divisible by `varied_every`;
    (entry number, sample) pairs in `failed` end with env_failed and reward 0."""
    calls = []

    def run(requests):
        calls.append(list(requests))
        out = []
        for r in requests:
            number = int(r.entry_id.rsplit("_", 1)[1])
            t = Trajectory(entry_id=r.entry_id, group_id=r.group_id, sample_index=r.sample_index,
                           category=r.category)
            t.append_observation([1, 2, 3])
            t.append_sampled([4, 5], [-0.5, -0.25])
            t.reward = float(r.sample_index % 2) if number % varied_every == 0 else 0.5
            if (number, r.sample_index) in failed:
                t.termination, t.reward = "env_failed", 0.0
            out.append(t)
        return out

    run.calls = calls
    return run


def test_requests_carry_the_seed_digest_and_continue_group_ids():
    cfg = _cfg()
    reqs = requests_for(cfg, 3, next(_prompts()), first_group=8)
    assert [r.group_id for r in reqs[::4]] == [8, 9, 10, 11]
    assert reqs[5].seed == episode_seed(cfg.seed, 3, 9, 1) != episode_seed(cfg.seed, 3, 9, 2)
    assert reqs[0].category == "base" and reqs[0].reward_kind == cfg.env.reward


def test_refill_reaches_prompts_per_step_varied_groups():
    # Entries 0, 8, 16, 24 (batches 0, 2, 4, 6) are the only groups with reward variance: 4 target groups need
    # 7 prompt batches (6 refills), more than the 2 refill rounds the trainer allowed.
    cfg = _cfg(max_refill_batches=10)
    rollout = _rollout(varied_every=8)
    exp = collect(cfg, 0, _prompts(), rollout)
    assert len(exp.groups) == 4
    assert all(len({t.reward for t in g}) > 1 for g in exp.groups)
    assert exp.stats["groups/kept"] == 4 and exp.stats["groups/short_of_target"] == 0
    assert exp.stats["groups/refill_batches"] == 6 == len(rollout.calls) - 1
    assert len(exp.trajectories) == 7 * 16
    # Group ids (hence seeds) never repeat across refill batches.
    ids = [r.group_id for call in rollout.calls for r in call[::4]]
    assert ids == list(range(28))


def test_refill_bound_stops_with_a_log_and_a_metric(caplog):
    cfg = _cfg(max_refill_batches=2)
    with caplog.at_level("WARNING", logger=experience.__name__):
        exp = collect(cfg, 5, _prompts(), _rollout(varied_every=8))
    # Batches 0..2 hold entries 0 and 8 with variance.
    assert len(exp.groups) == 2 and exp.stats["groups/short_of_target"] == 2
    assert exp.stats["groups/refill_batches"] == 2
    assert "algo.max_refill_batches=2" in caplog.text and "2 of 4 groups" in caplog.text


def test_failed_episodes_are_left_out_of_their_group_and_counted():
    # Entry 0 varies (samples 0/1/0/1 -> 0,1,0,1); sample 1 fails: the group keeps samples 0, 2, 3.
    cfg = _cfg(max_refill_batches=0, failed_episodes="exclude")
    exp = collect(cfg, 0, _prompts(), _rollout(varied_every=1, failed={(0, 1), (1, 0), (1, 1), (1, 2)}))
    assert exp.stats["episodes/env_failed"] == 4
    first = exp.groups[0]
    assert [t.sample_index for t in first] == [0, 2, 3]
    # Entry 1 has one episode left: no baseline, dropped.
    assert exp.stats["groups/dropped_env_failed"] == 1 and len(exp.groups) == 3
    adv = advantages_of(exp.groups, cfg.algo)[0]
    r = np.array([0.0, 0.0, 1.0])
    np.testing.assert_allclose(adv, (r - r.mean()) / (r.std(ddof=1) + 1e-6), rtol=1e-5)
    assert adv[0] < 0 and adv[2] > 0  # the failed episode's reward-0 does not drag the baseline down


def test_drop_group_policy_drops_any_group_with_a_failure():
    cfg = _cfg(max_refill_batches=0, failed_episodes="drop_group")
    exp = collect(cfg, 0, _prompts(), _rollout(varied_every=1, failed={(0, 1)}))
    assert exp.stats["groups/dropped_env_failed"] == 1
    assert [g[0].entry_id for g in exp.groups] == [f"multi_turn_base_{i}" for i in (1, 2, 3)]


def test_unknown_failed_episode_policy_is_named():
    with pytest.raises(ValueError, match="algo.failed_episodes 'retry'"):
        collect(_cfg(failed_episodes="retry"), 0, _prompts(), _rollout(varied_every=1))


def test_build_packs_uneven_groups_into_micro_batches():
    cfg = _cfg(max_refill_batches=0)
    exp = collect(cfg, 0, _prompts(), _rollout(varied_every=1, failed={(0, 1)}))
    minis, stats = build(exp.groups, cfg, rows_per_micro=2, cp=1)
    assert len(minis) == 1
    mb = minis[0]
    assert mb["tokens"].shape[1:] == (2, 64)
    # Every kept episode's 2 sampled tokens are trained on, each with its own advantage.
    assert mb["loss_mask"].sum() == 2 * sum(len(g) for g in exp.groups)
    want = np.sort(np.concatenate(advantages_of(exp.groups, cfg.algo)))
    seq = mb["advantages"][mb["loss_mask"] > 0].reshape(-1, 2)[:, 0]
    np.testing.assert_allclose(np.sort(seq), want, rtol=1e-6)
    assert stats["length/truncated_episodes"] == 0


def test_mini_batches_slice_episodes_in_order_with_whole_group_advantages():
    # 4 groups of 4 into 8 mini-batches (more than there are groups): 2 consecutive episodes each, each trained
    # with the advantage its whole group gave it.
    cfg = _cfg(max_refill_batches=0)
    cfg.train.mini_batches_per_step = 8
    exp = collect(cfg, 0, _prompts(), _rollout(varied_every=1))
    minis, _ = build(exp.groups, cfg, rows_per_micro=2, cp=1)
    assert len(minis) == 8
    flat = np.concatenate(advantages_of(exp.groups, cfg.algo))
    for i, mb in enumerate(minis):
        assert mb["loss_mask"].sum() == 2 * 2  # two episodes of 2 sampled tokens
        seq = mb["advantages"][mb["loss_mask"] > 0].reshape(-1, 2)[:, 0]
        np.testing.assert_allclose(np.sort(seq), np.sort(flat[2 * i:2 * i + 2]), rtol=1e-6)


def test_build_counts_truncated_episodes_and_keeps_their_advantage():
    cfg = _cfg(max_refill_batches=0)
    cfg.train.max_seq_len = 4  # every 5-token episode is cut after its 4th token
    exp = collect(cfg, 0, _prompts(), _rollout(varied_every=1))
    minis, stats = build(exp.groups, cfg, rows_per_micro=2, cp=1)
    episodes = sum(len(g) for g in exp.groups)
    assert stats["length/truncated_episodes"] == episodes == 16
    mb = minis[0]
    # Both sampled tokens are still targets (the last kept position predicts the token past the cut).
    assert mb["loss_mask"].sum() == 2 * episodes
    want = np.sort(np.concatenate(advantages_of(exp.groups, cfg.algo)))
    np.testing.assert_allclose(np.sort(mb["advantages"][mb["loss_mask"] > 0][::2]), want, rtol=1e-6)
