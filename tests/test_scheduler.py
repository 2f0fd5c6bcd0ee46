"""Slot scheduler (rollout/scheduler.py): reproducible batching whatever the timing of environment answers, late
answers that do not hold the other slots back, prefill batches within their budget.

Runs the real engine (tiny random model, real tokenizer) and a 2-worker env pool. `DelayedAnswers` is that real
pool with each answer handed on after a seeded random delay, so answers arrive in another order and at other times;
`RecordingEngine` is the real engine with a log of the calls the scheduler made.
"""

import random
import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest
from flax import nnx

from environments.bfcl.pool import EnvPool
from t3rl_jax.chat_format import ChatEncoder
from t3rl_jax.models.model_config import Qwen3Config
from t3rl_jax.models.qwen3 import Qwen3
from t3rl_jax.rollout.driver import EpisodeRequest, RolloutDriver, RolloutLimits
from t3rl_jax.rollout.engine import Qwen3Engine, SamplingSettings
from t3rl_jax.rollout.extend_batch import ExtendRequest
from t3rl_jax.rollout.scripted import ground_truth_reply


class DelayedAnswers:
    """The real pool; every answer is handed on `delay(entry_id)` seconds after the pool gave it."""

    def __init__(self, pool, delay):
        self.pool, self.delay = pool, delay
        self.handed = []  # (entry_id, issued_at, handed_at)
        self._lock = threading.Lock()

    def open(self, entry_id, *, augment=False, reward_kind="progress", prompt_style="t3rl"):
        return _DelayedEpisode(self, self.pool.open(entry_id, augment=augment, reward_kind=reward_kind,
                                                    prompt_style=prompt_style), entry_id)

    def relay(self, future, entry_id):
        out, issued, delay = Future(), time.perf_counter(), self.delay(entry_id)

        def hand_on():
            with self._lock:
                self.handed.append((entry_id, issued, time.perf_counter()))
            error = future.exception()
            out.set_exception(error) if error is not None else out.set_result(future.result())

        future.add_done_callback(lambda _: threading.Timer(delay, hand_on).start())
        return out


class _DelayedEpisode:
    def __init__(self, owner, remote, entry_id):
        self.owner, self.remote, self.entry_id = owner, remote, entry_id
        self.started = owner.relay(remote.started, entry_id)

    def __getattr__(self, op):  # step, record_text_reply, record_format_error, end_turn, finish
        method = getattr(self.remote, op)
        return lambda *args, **kwargs: self.owner.relay(method(*args, **kwargs), self.entry_id)


class RecordingEngine:
    """The real engine; logs (kind, slots, context bound, time) of every extend / generate call."""

    def __init__(self, engine):
        self._engine, self.calls = engine, []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def extend_slots(self, params, state, requests, *, context_bound=None):
        self.calls.append(("extend", tuple((r.slot, len(r.tokens), r.reset, r.limit) for r in requests),
                           context_bound, time.perf_counter()))
        return self._engine.extend_slots(params, state, requests, context_bound=context_bound)

    def generate_steps(self, params, state, num_steps, *, context_bound=None):
        out = self._engine.generate_steps(params, state, num_steps, context_bound=context_bound)
        active = tuple(np.asarray(out[3]).any(axis=0).tolist())
        self.calls.append(("generate", active, context_bound, time.perf_counter()))
        return out


@pytest.fixture(scope="module")
def chat():
    from t3rl_jax.tokenizer import load_tokenizer

    return ChatEncoder(load_tokenizer())


def _engine(seed, temperature):
    cfg = Qwen3Config(vocab_size=151936, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      intermediate_size=64)
    return Qwen3Engine(Qwen3(cfg, rngs=nnx.Rngs(seed)), max_concurrent_decodes=2, max_prefill_length=4096,
                       max_cache_length=6144, sampling=SamplingSettings(temperature=temperature))


@pytest.fixture(scope="module")
def pool():
    with EnvPool(num_workers=2) as pool:
        yield pool


@pytest.mark.slow
def test_rollouts_are_identical_whatever_the_order_and_timing_of_env_answers(chat, pool):
    engine = _engine(3, temperature=1.0)
    limits = RolloutLimits(max_response_tokens=10, max_model_calls=3, max_context_tokens=6144, decode_steps_per_call=4)
    requests = [EpisodeRequest(e, group_id=g, sample_index=s, seed=10 * g + s)
                for g, e in enumerate(["multi_turn_base_146", "multi_turn_base_1"]) for s in range(2)]
    runs = []
    for delay_seed in (None, None, 1, 2):
        rng = random.Random(delay_seed)
        env = pool if delay_seed is None else DelayedAnswers(pool, lambda _e: rng.uniform(0.0, 0.05))
        recorder = RecordingEngine(engine)
        trajs = RolloutDriver(recorder, env, chat, limits=limits).run(requests)
        runs.append((trajs, [c[:3] for c in recorder.calls]))
    first, calls = runs[0]
    assert all(t.num_model_calls == 3 for t in first)
    for trajs, other_calls in runs[1:]:
        assert other_calls == calls  # the same engine calls, on the same slots, in the same order
        for a, b in zip(first, trajs):
            assert a.token_ids == b.token_ids and a.loss_mask == b.loss_mask and a.logprobs == b.logprobs


@pytest.mark.slow
def test_a_late_env_answer_does_not_hold_the_other_slots_back(chat, pool):
    slow = "multi_turn_base_105"
    entries = [slow, "multi_turn_base_146", "multi_turn_base_1"]
    limits = RolloutLimits(max_context_tokens=6144, env_wait_s=0.2)
    env = DelayedAnswers(pool, lambda entry_id: 1.0 if entry_id == slow else 0.0)
    recorder = RecordingEngine(_engine(0, temperature=0.0))
    driver = RolloutDriver(recorder, env, chat, limits=limits, script=ground_truth_reply)
    trajs = driver.run([EpisodeRequest(e, group_id=i) for i, e in enumerate(entries)])
    assert [t.entry_id for t in trajs] == entries
    assert all(t.termination == "completed" and t.reward == 1.0 for t in trajs), [t.termination for t in trajs]
    assert driver.metrics.summary()["rollout/env_late_replies"] >= 1
    # While a slow answer was overdue (issued more than env_wait_s ago, not yet handed on), the engine kept working.
    overdue = [(issued + limits.env_wait_s, handed) for e, issued, handed in env.handed if e == slow]
    assert any(lo < t < hi for lo, hi in overdue for *_, t in recorder.calls)


def test_prefill_batches_stay_within_the_token_budget_and_the_row_cap(chat):
    from t3rl_jax.rollout.scheduler import MAX_PREFILL_ROWS, RolloutMetrics, SlotScheduler

    engine = Qwen3Engine(Qwen3(Qwen3Config(vocab_size=512, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                           head_dim=8, intermediate_size=32), rngs=nnx.Rngs(0)),
                         max_concurrent_decodes=40, max_prefill_length=2048, max_cache_length=4096)
    limits = RolloutLimits(max_context_tokens=4096, prefill_tokens_per_call=2048)
    scheduler = SlotScheduler(engine, limits, engine.sampling, RolloutMetrics(), stop_ids=chat.tokenizer.stop_ids)
    rng = np.random.default_rng(0)
    requests = [ExtendRequest(slot, [1] * int(rng.integers(1, 2048)) if slot % 3 else [2] * 40, reset=slot % 2 == 0)
                for slot in range(40)]
    batches = list(scheduler._prefill_batches(requests))
    assert [r for b in batches for r in b] == requests  # every request once, in order
    for i, batch in enumerate(batches):
        assert len(batch) <= MAX_PREFILL_ROWS
        assert len(batch) == 1 or engine.prefill_cost(batch) <= limits.prefill_tokens_per_call
        if i + 1 < len(batches):  # greedy: the next request did not fit this batch
            grown = batch + [batches[i + 1][0]]
            assert len(grown) > MAX_PREFILL_ROWS or engine.prefill_cost(grown) > limits.prefill_tokens_per_call
