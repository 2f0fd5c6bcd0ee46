"""BFCL multi-turn evaluation of a checkpoint on T3RL's 400 held-out entries, through the rollout engine and env pool.

    python scripts/eval_bfcl.py --checkpoint CKPT | --hf_dir D | --scripted [--config=NAME]
        [--split all|test|val] [--categories base miss_func ...] [--max_entries N] [--protocol bfcl|t3rl]
        [--out DIR] [--no_cross_check]

Defaults: the 400 held-out entries (val + test), the `bfcl` protocol (bfcl-eval's own prompt style and its step
limit per turn, imported from bfcl_eval), greedy, 20,000 new tokens per model call (T3RL's eval budget), a
49,152-token context that holds every held-out ground-truth replay, no hints. Every entry's executed calls are also
judged by bfcl-eval's own `multi_turn_checker`; the agreement is printed under the table. `--scripted` teacher-forces
the ground truth through the same path (a tiny random model does the prefill when no model is given): it must
score 100% with 100% agreement. Writes DIR/results.json (per-entry records, aggregates, disagreements, rollout
metrics) and DIR/results.md (the table, also printed). One implementation with training-time validation:
`t3rl_jax.eval.bfcl.evaluate`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from environments.bfcl import catalog
from environments.bfcl.pool import EnvPool
from t3rl_jax.chat_format import ChatEncoder
from t3rl_jax.eval import bfcl as bfcl_eval
from t3rl_jax.evaluation import markdown_table
from t3rl_jax.model_loading import add_model_source_args, load_model_from_args, split_config_args
from t3rl_jax.rollout.engine import Qwen3Engine, SamplingSettings
from t3rl_jax.rollout.scripted import ground_truth_reply
from t3rl_jax.tokenizer import load_tokenizer

eval_entry_ids = bfcl_eval.held_out_entry_ids  # kept for callers of the old name


def entry_record(t) -> dict:
    """What results.json keeps of one episode."""
    record = {
        "entry_id": t.entry_id, "category": t.category, "turn_correct": list(t.turn_correct),
        "progress": t.extras.get("progress", 0.0), "correct": bool(t.extras.get("binary", 0.0)),
        "termination": t.termination, "num_turns": t.num_turns, "num_model_calls": t.num_model_calls,
        "num_tool_calls": t.num_tool_calls, "num_tool_errors": t.num_tool_errors,
        "num_format_errors": t.num_format_errors, "tokens": t.length, "sampled_tokens": t.num_sampled,
        "prompt_tokens": t.prompt_length,
    }
    for key in ("env_error", "failure_reason", "cut_off_turns", "over_context"):
        if key in t.extras:
            record[key] = t.extras[key]
    return record


def scripted_model(max_context_tokens: int):
    """The smallest Qwen3 with the real vocabulary: scripted replies are forced, so only the prefill runs."""
    from flax import nnx

    from t3rl_jax.models.model_config import Qwen3Config
    from t3rl_jax.models.qwen3 import Qwen3

    cfg = Qwen3Config(vocab_size=151936, num_layers=1, hidden_size=16, num_heads=2, num_kv_heads=1, head_dim=8,
                      intermediate_size=32, max_position_embeddings=max(max_context_tokens, 40960))
    return Qwen3(cfg, rngs=nnx.Rngs(0))


def report_text(report, run_info: dict) -> str:
    lines = [markdown_table(report.scores)]
    if report.agreement is not None:
        lines.append(f"bfcl-eval multi_turn_checker agreement: {100 * report.agreement:.1f}% of "
                     f"{len(report.trajectories)} entries ({len(report.disagreements)} disagree)")
    over = {t.entry_id: t.extras["over_context"] for t in report.trajectories if "over_context" in t.extras}
    if over:
        lines.append(f"entries whose ground truth does not fit the context ({len(over)}): "
                     + "; ".join(f"{k}: {v}" for k, v in over.items()))
    else:
        lines.append(f"every entry's ground-truth replay fits the {run_info['limits']['max_context_tokens']}-token "
                     "context")
    return "\n".join(lines)


def write_results(out_dir: str, report, run_info: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    text = report_text(report, run_info)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({**run_info, "scores": report.scores, "agreement": report.agreement,
                   "disagreements": report.disagreements, "rollout": report.rollout,
                   "entries": [entry_record(t) for t in report.trajectories]}, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(f"# BFCL multi-turn: {run_info['model']} ({run_info['split']}, {run_info['protocol']} protocol"
                f"{', scripted ground truth' if run_info['scripted'] else ''})\n\n{text}\n")
    return text


def parse_args(argv):
    run_config, argv = split_config_args(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source_args(p, required=False)
    p.add_argument("--split", default="all", choices=bfcl_eval.SPLITS)
    p.add_argument("--categories", nargs="+", default=list(catalog.CATEGORIES), choices=catalog.CATEGORIES)
    p.add_argument("--max_entries", type=int, help="at most N entries per category (quick runs)")
    p.add_argument("--protocol", default="bfcl", choices=bfcl_eval.PROTOCOLS,
                   help="prompt style and step limits: bfcl-eval's (default) or T3RL's")
    p.add_argument("--out", default="eval_results", help="output directory (default: %(default)s)")
    p.add_argument("--scripted", action="store_true", help="replay the ground truth (teacher forcing)")
    p.add_argument("--no_cross_check", action="store_true", help="skip bfcl-eval's multi_turn_checker")
    p.add_argument("--max_steps_per_turn", type=int, help="default: the protocol's")
    p.add_argument("--max_model_calls", type=int, help="default: the protocol's")
    p.add_argument("--max_response_tokens", type=int, default=bfcl_eval.EVAL_RESPONSE_TOKENS,
                   help="new tokens per model call")
    p.add_argument("--max_context_tokens", type=int, default=bfcl_eval.EVAL_CONTEXT_TOKENS,
                   help="the episode's token cap, also the engine's KV cache length")
    p.add_argument("--max_prefill_length", type=int, default=8192, help="longer prompts go in chunks")
    p.add_argument("--slots", type=int, default=8, help="concurrent episodes (decode slots)")
    p.add_argument("--num_workers", type=int, default=2, help="environment processes (0: in-process)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.max_entries is not None and args.max_entries < 1:
        p.error(f"--max_entries must be >= 1, got {args.max_entries}")
    if not (args.checkpoint or args.hf_dir or args.scripted):
        p.error("give --checkpoint or --hf_dir (or --scripted to replay the ground truth)")
    return args, run_config


def limits_from_args(args):
    base = bfcl_eval.protocol_limits(args.protocol, max_context_tokens=args.max_context_tokens,
                                     max_response_tokens=args.max_response_tokens)
    return bfcl_eval.make_limits(
        max_steps_per_turn=args.max_steps_per_turn or base.max_steps_per_turn,
        max_model_calls=args.max_model_calls or base.max_model_calls,
        max_response_tokens=base.max_response_tokens, max_context_tokens=base.max_context_tokens)


def main(argv=None) -> int:
    args, run_config = parse_args(list(sys.argv[1:] if argv is None else argv))
    start = time.time()
    entry_ids = bfcl_eval.held_out_entry_ids(args.split, args.categories, args.max_entries)
    limits = limits_from_args(args)
    chat = ChatEncoder(load_tokenizer())
    # Bad budgets and unknown entries stop here, before any model is loaded or compiled.
    bfcl_eval.check_entries_exist(entry_ids, source=f"split {args.split!r}")
    bfcl_eval.check_budget(entry_ids, chat, limits, prompt_style=args.protocol, key="--max_context_tokens")
    if args.checkpoint or args.hf_dir:
        model, config = load_model_from_args(args, run_config)
    else:
        model = scripted_model(limits.max_context_tokens)
        config = model.config
    sampling = SamplingSettings(temperature=args.temperature, top_p=args.top_p)
    print(f"evaluating {len(entry_ids)} entries ({args.split}: {', '.join(args.categories)}; {args.protocol} "
          f"protocol){' with the scripted ground truth' if args.scripted else ''}", flush=True)
    engine = Qwen3Engine(model, tokenizer=chat.tokenizer, max_concurrent_decodes=args.slots,
                         max_prefill_length=min(args.max_prefill_length, limits.max_context_tokens),
                         max_cache_length=limits.max_context_tokens, sampling=sampling)
    with EnvPool(num_workers=args.num_workers) as pool:
        report = bfcl_eval.evaluate(engine=engine, pool=pool, chat=chat, entry_ids=entry_ids, limits=limits,
                                    sampling=sampling, prompt_style=args.protocol, seed=args.seed,
                                    cross_check=not args.no_cross_check,
                                    script=ground_truth_reply if args.scripted else None)
    run_info = {"model": args.checkpoint or args.hf_dir or "scripted", "step": args.step, "split": args.split,
                "categories": args.categories, "protocol": args.protocol, "scripted": args.scripted,
                "num_params": config.num_params, "limits": dataclasses.asdict(limits),
                "sampling": dataclasses.asdict(sampling), "wall_s": time.time() - start}
    print(write_results(args.out, report, run_info))
    print(f"wrote {os.path.join(args.out, 'results.json')} and results.md in {time.time() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
