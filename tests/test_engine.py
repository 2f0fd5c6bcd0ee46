"""Qwen3Engine: greedy parity with transformers, JetStream API semantics, prefix reuse, seeded sampling."""

import numpy as np
import pytest
import torch

from t3rl_jax.models import hf_io
from t3rl_jax.rollout.engine import Qwen3Engine, SamplingSettings, prefill_bucket
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
    hf, model = hf_and_model
    engine = _engine(model)
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


def test_prefill_buckets_are_few_and_tight():
    assert [prefill_bucket(n, 8192) for n in (1, 16, 17, 700, 1024, 1025, 2148, 8000)] == \
        [16, 16, 32, 1024, 1024, 2048, 3072, 8192]
    with pytest.raises(ValueError, match="max_prefill_length"):
        prefill_bucket(9000, 8192)
