"""Greedy decode tokens/s of our engine vs transformers `generate` (KV cache), same weights, same CPU, one run.

    python benchmarks/decode.py [--sequences 32] [--prompt 64] [--new 64] [--repeats 2]

The model is benchmarks/model_throughput.py's (4 layers, hidden 256, vocab 4096, GQA 8/4 heads), random weights
built in transformers and loaded into ours. Ours: each sequence is prefilled into its own slot
(`Qwen3Engine.extend_slot`, which also samples the first token), then all slots decode together in one
`generate_steps` call. Theirs: `model.generate(batch, do_sample=False, use_cache=True)` on the same prompts
(equal lengths, so no padding). Both produce `--new` tokens per sequence; the time covers prefill and decode. The
output also reports how many sequences came out token-identical (random weights leave near-ties, so a few may
differ by float rounding). Best of --repeats (taking turns) after a warm-up; the last line is `ratio=<ours / transformers>`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model_throughput import BENCH_HF, best_times, hf_model  # noqa: E402  (this script's folder is on sys.path)


def hf_decode(model, prompts, new_tokens: int):
    import torch

    with torch.no_grad():
        out = model.generate(torch.as_tensor(prompts, dtype=torch.long), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, use_cache=True, eos_token_id=None,
                             pad_token_id=0)
    return out[:, prompts.shape[1]:].numpy()


def our_decode(engine, prompts, new_tokens: int):
    import jax
    import numpy as np

    state = engine.init_decode_state()
    firsts = []
    for slot, prompt in enumerate(prompts):
        state, token, _, _ = engine.extend_slot(None, state, slot, prompt, reset=True, seed=slot)
        firsts.append(token)
    state, tokens, _, valid, _ = engine.generate_steps(engine.params, state, new_tokens - 1)
    jax.block_until_ready(tokens)
    if not bool(np.all(np.asarray(valid))):
        raise RuntimeError("a slot stopped early; the cache is too short for the benchmark")
    return np.concatenate([np.asarray(firsts)[None], np.asarray(tokens)], axis=0).T


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from t3rl_jax.models import hf_io
    from t3rl_jax.rollout.engine import Qwen3Engine, SamplingSettings

    torch.set_num_threads(os.cpu_count() or 1)
    hf = hf_model().eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = hf_io.load_hf(tmp)
    # Stop ids outside the vocabulary: every sequence decodes exactly --new tokens, as generate does.
    engine = Qwen3Engine(ours, max_concurrent_decodes=args.sequences, max_prefill_length=args.prompt,
                         max_cache_length=args.prompt + args.new, sampling=SamplingSettings(temperature=0.0),
                         stop_ids=(BENCH_HF["vocab_size"],))
    prompts = np.random.default_rng(0).integers(1, BENCH_HF["vocab_size"], (args.sequences, args.prompt))
    results = {}
    t_hf, t_ours = best_times([lambda: results.update(hf=hf_decode(hf, prompts, args.new)),
                               lambda: results.update(ours=our_decode(engine, prompts, args.new))], args.repeats)
    hf_tokens, our_tokens = results["hf"], results["ours"]
    n = args.sequences * args.new
    same = int(np.sum(np.all(hf_tokens == our_tokens, axis=1)))
    print(f"machine: {os.cpu_count()} CPU cores; {args.sequences} sequences, prompt {args.prompt}, {args.new} new "
          f"tokens, greedy, f32, best of {args.repeats}, alternating")
    print(f"transformers generate: {t_hf:7.2f} s  {n / t_hf:8.0f} tok/s")
    print(f"ours (engine):         {t_ours:7.2f} s  {n / t_ours:8.0f} tok/s")
    print(f"identical sequences: {same}/{args.sequences}")
    print(f"ratio={t_hf / t_ours:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
