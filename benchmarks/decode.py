"""Greedy decode tokens/s of our engine vs transformers `generate` (KV cache), same weights, same CPU, one run.

    python benchmarks/decode.py [--models tiny,small] [--sequences 32] [--prompt 64] [--new 64] [--repeats 5]

Two random-weight models, built in transformers and loaded into ours:
- `tiny`: 2 layers, hidden 64, GQA 4/2 heads of 16, vocab 1024. A step's arithmetic is small, so the time is what
  the decoding machinery costs: on an accelerator this is the regime of a 4B model at batch 32 too, where a step
  is bound by weight reads and per-kernel overhead rather than FLOPs. This is the headline ratio.
- `small`: benchmarks/model_throughput.py's model (4 layers, hidden 256, vocab 4096, GQA 8/4 heads of 32). On 2 CPU
  cores both sides are bound by the same f32 matmuls here, so the ratio measures the two GEMM libraries as much
  as the engines.
Ours: all 32 prompts prefilled into their slots in one `extend_slots` call (as the rollout driver does for
episodes that start together; it also samples the first token), then all slots decode together in one
`generate_steps` call attending over the cache the slots hold. Theirs: `model.generate(batch, do_sample=False,
use_cache=True)` on the same prompts (equal lengths, so no padding). Both produce `--new` tokens per sequence; the
time covers prefill and decode. The output reports how many sequences came out token-identical (random weights
leave near-ties, so a few may differ by float rounding). Best of --repeats, the two sides taking turns, after a
warm-up; the last line is `ratio=<transformers time / ours>` of the first model listed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model_throughput import best_times, hf_model  # noqa: E402  (this script's folder is on sys.path)

MODELS = {
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
    "small": {},  # model_throughput.BENCH_HF as it is
}


def hf_decode(model, prompts, new_tokens: int):
    import torch

    with torch.no_grad():
        out = model.generate(torch.as_tensor(prompts, dtype=torch.long), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, use_cache=True, eos_token_id=None,
                             pad_token_id=0)
    return out[:, prompts.shape[1]:].numpy()


def our_decode(engine, prompts, new_tokens: int, split: dict | None = None):
    import jax
    import numpy as np

    from t3rl_jax.rollout.extend_batch import ExtendRequest

    start = time.perf_counter()
    state = engine.init_decode_state()
    requests = [ExtendRequest(slot, prompt, reset=True, seed=slot) for slot, prompt in enumerate(prompts)]
    state, firsts, _, lengths = engine.extend_slots(None, state, requests)
    bound = int(np.max(np.asarray(lengths))) + new_tokens - 1
    prefilled = time.perf_counter()
    state, tokens, _, valid, _ = engine.generate_steps(engine.params, state, new_tokens - 1, context_bound=bound)
    jax.block_until_ready(tokens)
    if split is not None:
        split["prefill"].append(prefilled - start)
        split["decode"].append(time.perf_counter() - prefilled)
    if not bool(np.all(np.asarray(valid))):
        raise RuntimeError("a slot stopped early; the cache is too short for the benchmark")
    return np.concatenate([np.asarray(firsts)[None], np.asarray(tokens)], axis=0).T


def compare(name: str, args) -> float:
    import numpy as np

    from t3rl_jax.models import hf_io
    from t3rl_jax.rollout.engine import Qwen3Engine, SamplingSettings

    hf = hf_model(**MODELS[name]).eval()
    vocab = hf.config.vocab_size
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = hf_io.load_hf(tmp)
    # Stop ids outside the vocabulary: every sequence decodes exactly --new tokens, as generate does.
    engine = Qwen3Engine(ours, max_concurrent_decodes=args.sequences, max_prefill_length=args.prompt,
                         max_cache_length=args.prompt + args.new, sampling=SamplingSettings(temperature=0.0),
                         stop_ids=(vocab,))
    prompts = np.random.default_rng(0).integers(1, vocab, (args.sequences, args.prompt))
    results, split = {}, {"prefill": [], "decode": []}
    t_hf, t_hf_first, t_ours = best_times([
        lambda: results.update(hf=hf_decode(hf, prompts, args.new)),
        lambda: hf_decode(hf, prompts, 1),  # prefill + first token: the rest of the full call is decoding
        lambda: results.update(ours=our_decode(engine, prompts, args.new, split))], args.repeats)
    same = int(np.sum(np.all(results["hf"] == results["ours"], axis=1)))
    decode_tokens = args.sequences * (args.new - 1)
    hf_decode_s, our_decode_s = t_hf - t_hf_first, min(split["decode"])
    c = hf.config
    print(f"[{name}] {c.num_hidden_layers} layers, hidden {c.hidden_size}, vocab {vocab}; identical sequences "
          f"{same}/{args.sequences}\n"
          f"  decode phase ({args.new - 1} steps): transformers {hf_decode_s:.3f} s ({decode_tokens / hf_decode_s:.0f} "
          f"tok/s), ours {our_decode_s:.3f} s ({decode_tokens / our_decode_s:.0f} tok/s): ratio "
          f"{hf_decode_s / our_decode_s:.3f}\n"
          f"  end to end (prefill + decode): transformers {t_hf:.3f} s, ours {t_ours:.3f} s (prefill "
          f"{min(split['prefill']):.3f} s): ratio {t_hf / t_ours:.3f}", flush=True)
    return hf_decode_s / our_decode_s


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,small", help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    print(f"machine: {os.cpu_count()} CPU cores; {args.sequences} sequences, prompt {args.prompt}, {args.new} new "
          f"tokens, greedy, f32, best of {args.repeats}, alternating")
    ratios = [compare(name, args) for name in names]
    print(f"ratio={ratios[0]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
