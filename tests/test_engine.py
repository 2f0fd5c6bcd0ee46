"""Qwen3Engine: greedy parity with transformers, JetStream API semantics, prefix reuse, seeded sampling."""

import re

import numpy as np
import pytest
import torch

from t3rl_jax.models import hf_io
from t3rl_jax.rollout.engine import Qwen3Engine, SamplingSettings
from t3rl_jax.rollout.extend_batch import ExtendRequest, prefill_bucket
from tests import helpers_hf

STOP = (10_000,)  # outside the tiny vocab: generation runs to the length limit


@pytest.fixture(scope="module")
def hf_and_model(tmp_path_factory):
    hf = helpers_hf.make_hf_model(seed=3)
    path = helpers_hf.save_hf_dir(hf, tmp_path_factory.mktemp("hf"))
    return hf, hf_io.load_hf(path)


def _engine(model, **kw):
    kw.setdefault("sampling", SamplingSettings(temperature=0.0))
    return Qwen3Engine(model, max_concurrent_decodes=kw.pop("slots", 4), max_prefill_length=64,
                       max_cache_length=kw.pop("cache", 96), stop_ids=STOP, **kw)


def _hf_greedy(hf, prompt, n):
    with torch.no_grad():
        out = hf.generate(torch.as_tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_matches_transformers_generate_via_extend_and_generate(hf_and_model):
    from t3rl_jax.rollout.backend import RolloutBackend

    hf, model = hf_and_model
    engine = _engine(model)
    assert isinstance(engine, RolloutBackend)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 512, n).tolist() for n in (5, 17, 30, 9)]
    n_new = 12
    state = engine.init_decode_state()
    firsts = []
    for slot, p in enumerate(prompts):
        state, tok, _, _ = engine.extend_slot(None, state, slot, p, reset=True, seed=slot)
        firsts.append(int(tok))
    state, toks, _, valid, _ = engine.generate_steps(engine.params, state, n_new - 1)
    assert bool(np.all(np.asarray(valid)))
    for slot, p in enumerate(prompts):
        ours = [firsts[slot]] + np.asarray(toks)[:, slot].tolist()
        assert ours == _hf_greedy(hf, p, n_new), f"slot {slot}"


def test_jetstream_prefill_insert_generate_matches_and_logprobs_are_exact(hf_and_model):
    hf, model = hf_and_model
    engine = _engine(model, sampling=SamplingSettings(temperature=1.0))
    params = engine.load_params()
    prompt = list(range(3, 23))
    bucket = prefill_bucket(len(prompt), engine.max_prefill_length)
    padded = np.zeros(bucket, np.int32)
    padded[:len(prompt)] = prompt
    prefix = engine.prefill(params=params, padded_tokens=padded, true_length=len(prompt))
    state = engine.insert(prefix, engine.init_decode_state(), 2)
    seq = prompt + [int(prefix["token"][0])]
    lps = [float(prefix["logprob"][0])]
    for _ in range(6):
        state, result = engine.generate(params, state)
        res = result.convert_to_numpy()
        slot = res.get_result_at_slot(2)
        assert slot.valid.ravel()[0] and slot.lengths.ravel()[0] == len(seq)
        seq.append(int(slot.tokens.ravel()[0]))
        lps.append(float(res.data[2, 3:4].view(np.float32)[0]))
    # Sampled log-probs equal the log-softmax of a full forward over the final sequence.
    with torch.no_grad():
        logits = hf(torch.as_tensor([seq])).logits[0].float()
    ref = torch.log_softmax(logits, -1)
    want = [float(ref[len(prompt) - 1 + i, seq[len(prompt) + i]]) for i in range(len(lps))]
    np.testing.assert_allclose(lps, want, rtol=1e-4, atol=1e-4)


def test_existing_prefix_extension_equals_one_prefill(hf_and_model):
    _, model = hf_and_model
    engine = _engine(model)
    params = engine.load_params()
    a, b = list(range(5, 25)), list(range(40, 52))
    whole = engine.prefill(params=params, padded_tokens=np.asarray(a + b + [0] * 0), true_length=len(a + b))
    first = engine.prefill(params=params, padded_tokens=np.asarray(a + [0] * 12), true_length=len(a))
    ext = engine.prefill(params=params, existing_prefix=first, padded_tokens=np.asarray(b + [0] * 4),
                         true_length=len(b))
    assert int(ext["token"][0]) == int(whole["token"][0])
    np.testing.assert_allclose(float(ext["logprob"][0]), float(whole["logprob"][0]), rtol=1e-5)
    assert int(ext["cache"].lengths[0]) == len(a + b)


def test_multi_turn_extend_reuses_slot_history(hf_and_model):
    # prompt -> generate -> finish at the true length -> extend with an observation: equals a fresh prefill of all.
    _, model = hf_and_model
    engine = _engine(model)
    prompt, obs = list(range(7, 20)), list(range(100, 109))
    state = engine.init_decode_state()
    state, tok, _, _ = engine.extend_slot(None, state, 1, prompt, reset=True, seed=5)
    state, toks, _, _, _ = engine.generate_steps(engine.params, state, 4)
    sampled = [int(tok)] + np.asarray(toks)[:3, 1].tolist()  # keep 4 tokens, drop one decoded past "the stop"
    cache_len = len(prompt) + 3  # the last kept token is not yet fed
    state = engine.finish_slot(state, 1, cache_len)
    history = prompt + sampled
    state, tok2, lp2, length = engine.extend_slot(None, state, 1, history[cache_len:] + obs, reset=False)
    assert int(length) == len(history + obs)
    fresh = engine.init_decode_state()
    fresh, tok3, lp3, _ = engine.extend_slot(None, fresh, 0, history + obs, reset=True, seed=5)
    assert int(tok2) == int(tok3)
    np.testing.assert_allclose(float(lp2), float(lp3), rtol=1e-5, atol=1e-6)


def test_sampling_depends_only_on_seed_and_position(hf_and_model):
    _, model = hf_and_model
    engine = _engine(model, sampling=SamplingSettings(temperature=1.0), slots=3)
    prompt = list(range(30, 41))

    def run(slot, other):
        state = engine.init_decode_state()
        if other:
            state, *_ = engine.extend_slot(None, state, (slot + 1) % 3, list(range(60, 70)), reset=True, seed=99)
        state, tok, _, _ = engine.extend_slot(None, state, slot, prompt, reset=True, seed=1234)
        state, toks, _, _, _ = engine.generate_steps(engine.params, state, 8)
        return [int(tok)] + np.asarray(toks)[:, slot].tolist()

    assert run(0, False) == run(2, True)


def test_limit_and_stop_tokens_deactivate_slot(hf_and_model):
    _, model = hf_and_model
    engine = _engine(model)
    state = engine.init_decode_state()
    state, *_ = engine.extend_slot(None, state, 0, list(range(1, 11)), reset=True, limit=14)
    state, _, _, valid, lengths = engine.generate_steps(engine.params, state, 8)
    assert np.asarray(valid)[:, 0].tolist() == [True] * 4 + [False] * 4
    assert int(state.cache.lengths[0]) == 14
    with pytest.raises(ValueError, match="max_prefill_length"):
        engine.extend_slot(None, state, 1, list(range(100)), reset=True)


def _decode_all(engine, state, steps, **kw):
    state, toks, lps, valid, _ = engine.generate_steps(engine.params, state, steps, **kw)
    return state, np.asarray(toks), np.asarray(lps), np.asarray(valid)


def test_batched_extend_equals_one_slot_at_a_time_with_shared_prompts(hf_and_model):
    # One call: a GRPO group of 3 identical fresh prompts (different seeds: computed once, sampled apart), another
    # fresh prompt, and a slot continuing its history. Equal to extending the slots one by one.
    _, model = hf_and_model
    engine = _engine(model, sampling=SamplingSettings(temperature=1.0), slots=6)
    group, other, history, more = list(range(5, 25)), list(range(40, 47)), list(range(60, 75)), [3, 4, 5, 6]

    def prepared():
        state = engine.init_decode_state()
        state, *_ = engine.extend_slot(None, state, 5, history, reset=True, seed=77)
        return state

    requests = [ExtendRequest(0, group, reset=True, seed=11), ExtendRequest(2, group, reset=True, seed=12),
                ExtendRequest(3, other, reset=True, seed=13), ExtendRequest(5, more, reset=False),
                ExtendRequest(4, group, reset=True, seed=14)]
    assert engine.prefill_cost(requests) == 4 * prefill_bucket(20, 64)  # 3 distinct rows, padded to 4
    batched, tok_b, lp_b, len_b = engine.extend_slots(None, prepared(), requests)
    single = prepared()
    tok_s, lp_s, len_s = [], [], []
    for r in requests:
        single, tok, lp, length = engine.extend_slot(None, single, r.slot, r.tokens, reset=r.reset, seed=r.seed)
        tok_s.append(int(tok)), lp_s.append(float(lp)), len_s.append(int(length))
    assert np.asarray(tok_b).tolist() == tok_s and np.asarray(len_b).tolist() == len_s
    np.testing.assert_allclose(np.asarray(lp_b), lp_s, rtol=1e-5, atol=1e-6)
    _, toks_b, lps_b, valid_b = _decode_all(engine, batched, 6)
    _, toks_s, lps_s, valid_s = _decode_all(engine, single, 6)
    np.testing.assert_array_equal(toks_b, toks_s)
    np.testing.assert_array_equal(valid_b, valid_s)
    np.testing.assert_allclose(lps_b, lps_s, rtol=1e-5, atol=1e-5)
    assert len({tuple(toks_b[:, s]) for s in (0, 2, 4)}) == 3  # one prompt, three different samples
    with pytest.raises(ValueError, match="twice"):
        engine.extend_slots(None, engine.init_decode_state(), requests[:2] + [ExtendRequest(0, other, reset=True)])


def test_decoding_within_a_context_bound_equals_the_full_cache(hf_and_model):
    _, model = hf_and_model
    engine = _engine(model, sampling=SamplingSettings(temperature=1.0), cache=512)
    requests = [ExtendRequest(s, list(range(3 + s, 30 + 7 * s)), reset=True, seed=s) for s in range(3)]

    def run(**kw):
        state, *_ = engine.extend_slots(None, engine.init_decode_state(), requests)
        return _decode_all(engine, state, 8, **kw)[1:]

    longest = 30 + 7 * 2 - 3 - 2
    full, windowed = run(), run(context_bound=longest + 8)  # a 64-slot window of the 512-slot cache
    for a, b in zip(full, windowed):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # A continuing prefill within a bound equals one over the whole cache.
    more = list(range(200, 240))
    outs = []
    for bound in (None, len(requests[1].tokens) + len(more)):
        state, *_ = engine.extend_slots(None, engine.init_decode_state(), requests)
        state, tok, lp, length = engine.extend_slot(None, state, 1, more, reset=False, context_bound=bound)
        outs.append((int(tok), float(lp), int(length)))
    assert outs[0][::2] == outs[1][::2] and abs(outs[0][1] - outs[1][1]) < 1e-5
    state, *_ = engine.extend_slot(None, engine.init_decode_state(), 0, list(range(1, 65)), reset=True)
    state, *_ = engine.extend_slot(None, state, 0, list(range(1, 65)), reset=False)  # 128 cached: past a 64 window
    with pytest.raises(ValueError, match="context_bound"):
        engine.generate_steps(engine.params, state, 2, context_bound=64)
    with pytest.raises(ValueError, match="context_bound"):
        engine.extend_slot(None, state, 0, [5, 6], reset=False, context_bound=100)
    state, _, _, length = engine.extend_slot(None, state, 0, [5, 6], reset=False)  # the state was kept
    assert int(length) == 130


FLOAT_COLLECTIVE = re.compile(r"=\s*(?P<type>[^=]*?)\s(?P<op>all-reduce|all-gather|all-to-all|reduce-scatter|"
                              r"collective-permute)(-start)?\(")


def loop_body_collectives(hlo: str) -> list[str]:
    """Collective instructions with a float result inside every while-loop body of a compiled module (nested
    loops included)."""
    computations = {}
    for block in hlo.split("\n\n"):
        header = block.strip().split("\n", 1)[0]
        m = re.match(r"(?:ENTRY\s+)?%?([\w.\-]+)\s", header)
        if m:
            computations[m.group(1)] = block
    bodies, todo = set(), [n for block in computations.values() for n in re.findall(r"body=%?([\w.\-]+)", block)]
    while todo:
        name = todo.pop()
        if name in bodies or name not in computations:
            continue
        bodies.add(name)
        todo += re.findall(r"(?:body|calls|to_apply|branch_computations=\{)=?%?([\w.\-]+)", computations[name])
    assert bodies, "no while loop found in the compiled decode"
    found = []
    for name in bodies:
        for line in computations[name].splitlines():
            m = FLOAT_COLLECTIVE.search(line)
            if m and re.search(r"\b(f16|bf16|f32|f64)\[", m.group("type")):
                found.append(line.strip())
    return found


def test_decode_state_is_split_over_every_mesh_axis_and_decodes_like_one_device(hf_and_model):
    import jax
    from flax import nnx

    from t3rl_jax import sharding as sh

    _, model = hf_and_model
    mesh = sh.make_mesh({"data": 2, "fsdp": 2, "tensor": 1, "sequence": 2})
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rules = sh.logical_axis_rules(fsdp_over_sequence=True)  # stage 2's weights: embed over fsdp x sequence
    on_mesh = nnx.merge(graphdef, jax.device_put(params, sh.state_shardings(params, mesh, rules)), rest)
    sampled = SamplingSettings(temperature=1.0, top_p=0.9)
    engines = [_engine(on_mesh, slots=8, mesh=mesh, sampling=sampled, valid_vocab_size=500),
               _engine(model, slots=8, sampling=sampled, valid_vocab_size=500)]
    state = engines[0].init_decode_state()
    for leaf in jax.tree.leaves(state):  # every device holds its own slot of every buffer, nothing more
        assert leaf.sharding.spec[0] == ("data", "fsdp", "sequence")
        assert {shard.data.shape[0] for shard in leaf.addressable_shards} == {1}
    # Several computed rows (a shared prompt fanned out, distinct prompts) and a continuing slot, then decode:
    # a slot's tokens depend only on (seed, position), so the mesh gives exactly the one-device tokens.
    shared = list(range(40, 61))
    requests = [ExtendRequest(s, shared if s % 3 == 0 else list(range(2 + s, 12 + 3 * s)), reset=True, seed=s)
                for s in range(8)]
    more = [ExtendRequest(5, [7, 8, 9], reset=False), ExtendRequest(1, shared, reset=True, seed=21)]
    outputs = []
    for engine in engines:
        state, first, first_lp, _ = engine.extend_slots(None, engine.init_decode_state(), requests)
        state, toks, lps, _ = _decode_all(engine, state, 5)[:4]
        state, again, again_lp, lengths = engine.extend_slots(None, state, more)
        state, last = _decode_all(engine, state, 3)[:2]
        outputs.append([np.asarray(x) for x in (first, first_lp, toks, lps, again, again_lp, lengths, last)])
    state = engines[0].finish_slot(engines[0].init_decode_state(), 3, 0)
    assert [leaf.sharding.spec[0] for leaf in jax.tree.leaves(state)] == [("data", "fsdp", "sequence")] * len(
        jax.tree.leaves(state))  # calls keep the state's placement
    for got, want in zip(*outputs):
        if got.dtype.kind == "f":
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        else:
            np.testing.assert_array_equal(got, want)
    assert int(outputs[0][6][0]) == 20 + 5 + 3  # slot 5: its 20-token prompt, 5 decoded tokens fed, then 3 more
    # Inside the decode loop no float crosses devices: the weights and the embedding table are gathered once per
    # call and every cache write stays on the device holding its slot (only per-slot ints and flags move).
    engine = engines[0]
    hlo = engine.generate_function.lower(engine.params, engine.init_decode_state(), num_steps=4).compile().as_text()
    assert not loop_body_collectives(hlo), loop_body_collectives(hlo)


def test_loop_body_collectives_finds_float_collectives_of_every_kind():
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from t3rl_jax import sharding as sh

    mesh = sh.make_mesh({"data": 8, "fsdp": 1, "tensor": 1, "sequence": 1})
    table = jax.device_put(jnp.ones((64, 16)), NamedSharding(mesh, P(None, "data")))

    def decode(table, tokens):  # a lookup into an embed-sharded table: what the decode loop did before
        def body(carry, _):
            x, tokens = carry
            rows = jax.lax.with_sharding_constraint(jnp.take(table, tokens, axis=0) + x, NamedSharding(mesh, P("data")))
            return (rows, (tokens + 1) % 64), None
        return jax.lax.scan(body, (jnp.zeros((8, 16)), tokens), None, length=3)[0]

    tokens = jax.device_put(jnp.arange(8), NamedSharding(mesh, P("data")))
    found = loop_body_collectives(jax.jit(decode).lower(table, tokens).compile().as_text())
    assert found and all(re.search(r"f32\[", line) for line in found), found


def test_long_extend_goes_in_query_tiles_and_equals_transformers(hf_and_model):
    # 300 + 200 tokens: more than one attention tile (kv_cache.EXTEND_QUERY_BLOCK queries) per extend, the second
    # on top of the slot's history; the sampled log-probs equal a full transformers forward.
    from t3rl_jax.models.kv_cache import EXTEND_QUERY_BLOCK

    hf, model = hf_and_model
    engine = Qwen3Engine(model, max_concurrent_decodes=2, max_prefill_length=512, max_cache_length=1024,
                         sampling=SamplingSettings(temperature=1.0), stop_ids=STOP)
    rng = np.random.default_rng(4)
    first, second = rng.integers(1, 512, 300).tolist(), rng.integers(1, 512, 200).tolist()
    assert len(first) > 2 * EXTEND_QUERY_BLOCK
    state, tok1, lp1, _ = engine.extend_slot(None, engine.init_decode_state(), 1, first, reset=True, seed=3)
    state = engine.finish_slot(state, 1, len(first))  # drop the sampled token: the next extend continues the prompt
    state, tok2, lp2, length = engine.extend_slot(None, state, 1, second, reset=False)
    assert int(length) == 500
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.as_tensor([first + second])).logits[0].float(), -1)
    np.testing.assert_allclose([float(lp1), float(lp2)], [float(ref[299, int(tok1)]), float(ref[499, int(tok2)])],
                               rtol=1e-4, atol=1e-4)


def test_prefill_buckets_are_few_and_tight():
    assert [prefill_bucket(n, 8192) for n in (1, 16, 17, 700, 1024, 1025, 2148, 8000)] == \
        [128, 128, 128, 1024, 1024, 2048, 3072, 8192]
    with pytest.raises(ValueError, match="max_prefill_length"):
        prefill_bucket(9000, 8192)


@pytest.mark.slow
def test_h200_decode_loop_has_no_conditional_and_no_float_collective():
    """The decode loop compiled for 8 H200s (compile-only devices): no `conditional` anywhere (a data-dependent
    branch in a GPU loop is a device-to-host round trip per step) and no float collective inside the loop."""
    import jax.numpy as jnp

    from t3rl_jax import model_factory
    from t3rl_jax import sharding as sh
    from t3rl_jax.accel import targets
    from t3rl_jax.config import config_from_argv

    try:
        mesh = targets.mesh_for("h200", dict(zip(sh.MESH_AXES, (1, 8, 1, 1))))
    except targets.TargetError as e:
        pytest.skip(str(e))
    cfg, _ = config_from_argv(["--config=tiny", "--config.model.num_layers=1"])
    bundle = model_factory.build(cfg, mesh, sh.logical_axis_rules(fsdp_over_sequence=True))
    engine = Qwen3Engine(bundle.rollout_model(bundle.abstract_params), max_concurrent_decodes=8,
                         max_prefill_length=64, max_cache_length=256, mesh=mesh, cache_dtype=jnp.bfloat16,
                         sampling=SamplingSettings(temperature=1.0, top_p=0.9), valid_vocab_size=151_669)
    jitted, args, static = engine.compile_targets(bundle.abstract_params)["decode_loop"]
    hlo = jitted.trace(*args, **static).lower().compile().as_text()
    assert "while(" in hlo
    assert not re.findall(r"\sconditional\(", hlo)
    assert not loop_body_collectives(hlo), loop_body_collectives(hlo)
