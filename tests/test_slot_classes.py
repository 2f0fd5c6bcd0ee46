"""Slot classes by context length (rollout/slot_classes.py, slot_pool.py and the scheduler's moves): placement, an
episode that outgrows its slot moving up and going on exactly as in a large slot, waiting (not deadlocking) while
the large slots are busy, the fit check of every class, and the config's checks of `rollout.slot_classes`.

The rollout tests run the real driver, engine (a tiny random model, the real tokenizer) and a 2-worker env pool.
"""

import os
import re
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from t3rl_jax.config import ConfigError, load_config
from t3rl_jax.rollout.slot_pool import SlotPool, fits

ENTRIES = ["multi_turn_base_105", "multi_turn_base_146", "multi_turn_base_1", "multi_turn_miss_param_105"]


def test_new_episodes_take_the_smallest_class_and_leave_a_reserve_in_larger_ones():
    pool = SlotPool(((2, 100), (2, 400), (1, 1000)))
    assert [pool.take_new() for _ in range(4)] == [0, 1, 2, None]  # class 2 keeps 1 free, class 3 its only one
    pool.release(1)
    assert pool.take_new() == 1
    assert [pool.capacity(s) for s in range(5)] == [100, 100, 400, 400, 1000]
    # An episode that outgrows its slot gets the smallest class that holds it, reserve or not.
    assert pool.take_fitting(150, 300) == 3
    assert pool.take_fitting(150, 300) == 4  # class 2 is full: a larger class does
    assert pool.take_fitting(150, 300) is None  # nothing free that holds it: it waits
    pool.release(3)
    assert pool.take_fitting(99, 500) == 3


def test_a_slot_fits_a_history_with_room_for_one_more_token_or_the_whole_reply():
    assert fits(100, 99, 400) and not fits(100, 100, 400)
    assert fits(100, 100, 100)  # the reply ends exactly at the slot's end (a scripted reply, all but one token)
    assert not fits(100, 101, 101)


def test_slot_classes_must_increase():
    with pytest.raises(ValueError, match=r"increasing cache lengths.*\(2, 400\), \(1, 100\)"):
        SlotPool(((2, 400), (1, 100)))


# ------------------------------------------------------------------ the move itself
@pytest.mark.parametrize("mesh_axes", [None, {"data": 2, "fsdp": 2, "tensor": 1, "sequence": 2}])
def test_move_slot_copies_the_history_bit_for_bit_and_empties_the_source(mesh_axes):
    from t3rl_jax import sharding as sh
    from t3rl_jax.models.model_config import Qwen3Config
    from t3rl_jax.models.qwen3 import Qwen3
    from t3rl_jax.rollout.engine import SamplingSettings
    from t3rl_jax.rollout.extend_batch import ExtendRequest
    from t3rl_jax.rollout.slot_classes import SlotClassBackend

    model = Qwen3(Qwen3Config(vocab_size=512, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                              intermediate_size=64), rngs=nnx.Rngs(1))
    mesh = sh.make_mesh(mesh_axes) if mesh_axes else None
    if mesh is not None:  # the weights FSDP-split as in a run
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        model = nnx.merge(graphdef, jax.device_put(params, sh.state_shardings(params, mesh, sh.logical_axis_rules())),
                          rest)
    backend = SlotClassBackend.build(model, ((8, 64), (8, 128)), max_prefill_length=64, mesh=mesh, stop_ids=(9999,),
                                     sampling=SamplingSettings(temperature=1.0))
    state = backend.init_decode_state()
    state, *_ = backend.extend_slots(None, state, [ExtendRequest(3, list(range(1, 41)), reset=True, seed=7),
                                                   ExtendRequest(9, [5] * 10, reset=True, seed=8)])
    state, *_ = backend.generate_steps(backend.params, state, 4, context_bound={3: 48, 9: 20})
    before = jax.tree.map(np.asarray, state[0])
    state = backend.move_slot(state, 3, 8 + 6, limit=100, decoding=True)
    small, large = (jax.tree.map(np.asarray, s) for s in state)
    n = 64
    for k_src, k_dst, v_src, v_dst in zip(before.cache.k, large.cache.k, before.cache.v, large.cache.v):
        assert np.array_equal(k_dst[6, :, :, :n], k_src[3]) and np.array_equal(v_dst[6, :, :n], v_src[3])
    assert np.array_equal(large.cache.positions[6, :n], before.cache.positions[3])
    assert np.array_equal(large.cache.segment_ids[6, :n], before.cache.segment_ids[3])
    assert np.all(large.cache.segment_ids[6, n:] == 0)
    assert large.cache.lengths[6] == before.cache.lengths[3] == 44
    for field in ("tokens", "seeds", "temperature", "top_p"):
        assert getattr(large, field)[6] == getattr(before, field)[3], field
    assert large.active[6] and large.limits[6] == 100
    assert not small.active[3] and small.cache.lengths[3] == 0 and np.all(small.cache.segment_ids[3] == 0)
    assert large.cache.lengths[1] == 14  # the other slots are untouched (10 prefilled + 4 decoded)
    for a, b in zip(jax.tree.leaves(state[0]), jax.tree.leaves(backend.init_decode_state()[0])):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)  # the states keep their placement
    # The moved slot decodes on from its cache: 4 more tokens, at 44..47.
    state, _, _, valid, lengths = backend.generate_steps(backend.params, state, 4, context_bound={14: 52})
    assert valid[:, 14].all() and lengths[:, 14].tolist() == [45, 46, 47, 48]


# ------------------------------------------------------------------ rollouts
@pytest.fixture(scope="module")
def chat():
    from t3rl_jax.chat_format import ChatEncoder
    from t3rl_jax.tokenizer import load_tokenizer

    return ChatEncoder(load_tokenizer())


def _run(backend, requests, chat, pool):
    from t3rl_jax.rollout.driver import RolloutDriver, RolloutLimits

    limits = RolloutLimits(max_context_tokens=8192, max_response_tokens=600, max_model_calls=2,
                           decode_steps_per_call=8)
    driver = RolloutDriver(backend, pool, chat, limits=limits)
    return driver.run(requests), driver.metrics.summary()


@pytest.fixture(scope="module")
def rollouts(chat):
    """Episodes of ~3.6k-token prompts and replies of up to 600 tokens, each passing 4,096 tokens in its first reply:
    alone on 1 slot of 4,096 tokens + 1 of 8,192 and alone on one 8,192-token slot (greedy), and four together on
    3 slots of 4,096 + 1 of 8,192 (sampled at temperature 1).

    Why greedy for the pair compared: a slot of a 4,096-token cache and one of 8,192 round attention differently in
    the last bit even before anything moves (XLA:CPU; log-probs ~1e-6 apart from token ~3,700 on, measured), and
    the random model's distribution over 151,936 ids is so flat (logits spread ~0.3) that such a difference moves a
    sampled draw to a neighbouring id every few hundred tokens, moved or not. An argmax is far from such edges; the
    copy itself is checked bit for bit above, and the draws' (seed, position) keys by tests/test_engine.py.
    """
    from environments.bfcl.pool import EnvPool
    from t3rl_jax.models.model_config import Qwen3Config
    from t3rl_jax.models.qwen3 import Qwen3
    from t3rl_jax.rollout.driver import EpisodeRequest
    from t3rl_jax.rollout.engine import Qwen3Engine, SamplingSettings
    from t3rl_jax.rollout.slot_classes import SlotClassBackend

    cfg = Qwen3Config(vocab_size=151936, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      intermediate_size=64)
    model = Qwen3(cfg, rngs=nnx.Rngs(5))
    greedy = dict(max_prefill_length=4096, sampling=SamplingSettings(temperature=0.0))
    flat = dict(max_prefill_length=4096, sampling=SamplingSettings(temperature=1.0))
    requests = [EpisodeRequest(e, group_id=i, seed=40 + i) for i, e in enumerate(ENTRIES)]
    with EnvPool(num_workers=2) as pool:
        alone = SlotClassBackend.build(model, ((1, 4096), (1, 8192)), **greedy)
        big = Qwen3Engine(model, max_concurrent_decodes=1, max_cache_length=8192, **greedy)
        return {"moved": [_run(alone, [r], chat, pool) for r in requests[:2]],
                "big": [_run(big, [r], chat, pool) for r in requests[:2]],
                "crowded": _run(SlotClassBackend.build(model, ((3, 4096), (1, 8192)), **flat), requests, chat,
                                pool)}


@pytest.mark.slow
def test_an_episode_that_outgrows_its_slot_moves_up_and_samples_what_a_large_slot_would(rollouts):
    for (moved, metrics), (reference, _) in zip(rollouts["moved"], rollouts["big"]):
        (a,), (b,) = moved, reference
        assert b.length > 4096 and b.prompt_length + 600 > 4096  # its first reply passes the small slot's end
        assert metrics["rollout/migrations"] == 1  # mid-reply, then it stays
        # The same tokens: the move copies the cache and each draw depends on (seed, position) only.
        assert a.token_ids == b.token_ids and a.loss_mask == b.loss_mask, a.entry_id
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-4, atol=1e-5)
        assert a.termination == b.termination
        assert 0 < metrics["rollout/slot_occupancy_4096"] <= 1 and 0 < metrics["rollout/slot_occupancy_8192"] <= 1


@pytest.mark.slow
def test_episodes_wait_while_the_large_slot_is_busy_and_all_finish(rollouts):
    trajs, metrics = rollouts["crowded"]
    # Four episodes outgrow their small slots, one large slot: they took it in turn (waiting whole ticks while it
    # was busy), and every one ran to its end.
    assert metrics["rollout/migrations"] == len(ENTRIES)
    assert metrics["rollout/migration_wait_ticks"] > 0
    assert [t.entry_id for t in trajs] == ENTRIES
    assert all(t.termination == "max_model_calls" and t.num_model_calls == 2 and t.length > 4096 for t in trajs)


# ------------------------------------------------------------------ fit check
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))

TINY_CLASSES = ["--config=tiny", "--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.model.vocab_size=512",
                "--config.train.max_seq_len=512", "--config.train.micro_batch_size=8",
                "--config.rollout.max_context_tokens=512", "--config.rollout.max_response_tokens=256",
                "--config.rollout.max_prefill_length=256", "--config.rollout.prefill_tokens_per_call=256",
                "--config.rollout.slot_classes=((16, 256), (8, 512))", "--config.rollout.max_concurrent_decodes=24"]


@pytest.mark.slow
def test_fit_check_compiles_every_class_and_sums_their_decode_states(capsys):
    import fit_check

    assert fit_check.main(TINY_CLASSES) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines() if line.split() and "@" in line.split()[0]]
    # The longest prefill, and as many rows as a call may hold: a 256-token budget over the smallest bucket (128).
    assert names == [fn + suffix for suffix in ("@16x256", "@8x512")
                     for fn in ("decode_state", "extend_1x256", "extend_2x128", "decode_loop")] + ["move_to_512@16x256"]
    resident = {m.group(1): int(m.group(2).replace(",", ""))
                for m in re.finditer(r"resident (\S+):\s+[\d.]+ GiB\s+\(([\d,]+)\)", out)}
    # Per device (each class's slots split over the 8 devices): K and V of 2 layers x 2 KV heads x 16 dims in f32
    # and an int32 position and segment id per cached token; 6 int32 / f32 per-slot fields and a bool.
    per_token = 2 * 2 * 2 * 16 * 4 + 2 * 4
    for slots, length in ((16, 256), (8, 512)):
        assert resident[f"decode_state@{slots}x{length}"] == slots // 8 * (length * per_token + 6 * 4 + 1)
    rows = [line.split() for line in out.splitlines() if len(line.split()) == 7 and line.split()[0] != "function"]
    transients = [float(row[5]) for row in rows]  # every function's, the train step's included
    peak = int(out.strip().splitlines()[-1].split("peak_per_device_bytes=")[1])
    assert abs(peak / 2**30 - (sum(resident.values()) / 2**30 + max(transients))) < 0.01


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("classes,total,message", [
    ("((16, 4096), (8,))", 24, r"rollout.slot_classes: must be \(slots, context_tokens\) pairs"),
    ("((0, 4096), (8, 4608))", 8, r"rollout.slot_classes: every class needs slots >= 1.*\(0, 4096\)"),
    ("((8, 4608), (8, 4096))", 16, r"rollout.slot_classes: context_tokens must increase.*\[4608, 4096\]"),
    ("((8, 1024), (8, 4096))", 16, r"rollout.slot_classes: the largest class holds 4096 tokens < "
                                   r"rollout.max_context_tokens=4608"),
    ("((8, 1024), (4, 4608))", 8, r"rollout.max_concurrent_decodes: must equal the slots of "
                                  r"rollout.slot_classes=\(\(8, 1024\), \(4, 4608\)\): 12 \(got 8\)"),
])
def test_bad_slot_classes_name_the_key_and_the_numbers(classes, total, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [f"rollout.slot_classes={classes}", f"rollout.max_concurrent_decodes={total}"])


def test_slot_classes_build_a_backend_of_one_engine_per_class():
    from t3rl_jax.models.model_config import Qwen3Config
    from t3rl_jax.models.qwen3 import Qwen3
    from t3rl_jax.rollout.factory import make_backend

    cfg = load_config("tiny", ["rollout.slot_classes=[[6, 1024], [2, 4608]]", "rollout.max_concurrent_decodes=8"])
    model = Qwen3(Qwen3Config(vocab_size=512, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                              head_dim=8, intermediate_size=32), rngs=nnx.Rngs(0))
    backend = make_backend(model, cfg.rollout)
    assert backend.slot_classes == ((6, 1024), (2, 4608))
    assert backend.max_concurrent_decodes == 8 and backend.max_cache_length == 4608
    assert [backend.slot_capacity(s) for s in (0, 5, 6, 7)] == [1024, 1024, 4608, 4608]
    # The classes share one set of parameter arrays.
    assert all(a is b for a, b in zip(jax.tree.leaves(backend.engines[1].params), jax.tree.leaves(backend.params)))
    hlo = backend.generate_function.lower(backend.params, backend.init_decode_state(), num_steps=2).compile()
    assert hlo.as_text().count("while") >= 2  # one decode loop per class (run.loop's dump_hlo)
    single = make_backend(model, load_config("tiny").rollout)
    assert single.slot_classes == ((8, 4608),)
