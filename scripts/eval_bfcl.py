"""BFCL multi-turn evaluation of a checkpoint on T3RL's held-out split, through the rollout engine and env pool.

    python scripts/eval_bfcl.py --checkpoint CKPT | --hf_dir D [--config=NAME] [--split test|val|all]
        [--categories base miss_func ...] [--max_entries N] [--out DIR] [--scripted]

Every entry is one greedy episode (by default) on the same engine, driver, environments and per-turn scoring as
training, with BFCL-like limits (20 replies per user turn). `all` is val + test: the 400 entries T3RL holds out.
`--scripted` teacher-forces the ground truth through the same path instead of sampling; it must score 100%.
Writes DIR/results.json (per-entry turn_correct / progress / termination, aggregates, rollout metrics) and
DIR/results.md (the table, also printed). `--config=NAME` (with `--config.KEY=VALUE` overrides) names the run
preset a trainer checkpoint was trained with, when its architecture cannot be found next to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time


from environments.bfcl import catalog, splits
from environments.bfcl.pool import EnvPool
from t3rl_jax.chat_format import ChatEncoder
from t3rl_jax.evaluation import category_of, markdown_table, score_trajectories
from t3rl_jax.model_loading import add_model_source_args, load_model_from_args, split_config_args
from t3rl_jax.rollout.driver import EpisodeRequest, RolloutDriver, RolloutLimits
from t3rl_jax.rollout.engine import Qwen3Engine, SamplingSettings
from t3rl_jax.rollout.scripted import ground_truth_reply
from t3rl_jax.tokenizer import load_tokenizer

SPLITS = ("test", "val", "all")


def eval_entry_ids(split: str, categories=catalog.CATEGORIES, max_entries: int | None = None) -> list[str]:
    """Entry ids of a T3RL split (`all` = val + test), category by category; at most `max_entries` per category."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    unknown = [c for c in categories if c not in catalog.CATEGORIES]
    if unknown:
        raise ValueError(f"unknown categories {unknown}; expected some of {', '.join(catalog.CATEGORIES)}")
    if max_entries is not None and max_entries < 1:
        raise ValueError(f"max_entries must be >= 1, got {max_entries}")
    parts = ("val", "test") if split == "all" else (split,)
    ids = []
    for category in categories:
        chosen = sorted((i for p in parts for i in splits.split_entry_ids(p, (category,))),
                        key=lambda i: catalog.parse_entry_id(i)[1])
        ids.extend(chosen[:max_entries])
    return ids


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
    for key in ("env_error", "failure_reason", "cut_off_turns"):
        if key in t.extras:
            record[key] = t.extras[key]
    return record


def run_eval(model, entry_ids: list[str], *, limits: RolloutLimits, sampling: SamplingSettings, slots: int,
             max_prefill_length: int, num_workers: int, scripted: bool = False, seed: int = 0):
    """(trajectories, scores, rollout metrics) of one episode per entry."""
    chat = ChatEncoder(load_tokenizer())
    engine = Qwen3Engine(model, max_concurrent_decodes=slots, max_prefill_length=max_prefill_length,
                         max_cache_length=limits.max_context_tokens, sampling=sampling)
    requests = [EpisodeRequest(e, group_id=i, seed=seed + i, reward_kind="progress", category=category_of(e))
                for i, e in enumerate(entry_ids)]
    with EnvPool(num_workers=num_workers) as pool:
        driver = RolloutDriver(engine, pool, chat, limits=limits, sampling=sampling,
                               script=ground_truth_reply if scripted else None)
        trajectories = driver.run(requests)
    return trajectories, score_trajectories(trajectories), driver.metrics.summary()


def write_results(out_dir: str, trajectories, scores: dict, run_info: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    table = markdown_table(scores)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({**run_info, "scores": scores, "entries": [entry_record(t) for t in trajectories]}, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(f"# BFCL multi-turn: {run_info['model']} ({run_info['split']}"
                f"{', scripted ground truth' if run_info['scripted'] else ''})\n\n{table}\n")
    return table


def parse_args(argv):
    run_config, argv = split_config_args(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source_args(p)
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--categories", nargs="+", default=list(catalog.CATEGORIES), choices=catalog.CATEGORIES)
    p.add_argument("--max_entries", type=int, help="at most N entries per category (quick runs)")
    p.add_argument("--out", default="eval_results", help="output directory (default: %(default)s)")
    p.add_argument("--scripted", action="store_true", help="replay the ground truth (teacher forcing)")
    p.add_argument("--max_steps_per_turn", type=int, default=20)
    p.add_argument("--max_model_calls", type=int, default=200, help="replies per episode")
    p.add_argument("--max_response_tokens", type=int, default=20_000, help="tokens after the first prompt")
    p.add_argument("--max_context_tokens", type=int, default=32_768, help="also the engine's KV cache length")
    p.add_argument("--max_prefill_length", type=int, default=4096, help="longer prompts go in chunks")
    p.add_argument("--slots", type=int, default=8, help="concurrent episodes (decode slots)")
    p.add_argument("--num_workers", type=int, default=2, help="environment processes (0: in-process)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.max_entries is not None and args.max_entries < 1:
        p.error(f"--max_entries must be >= 1, got {args.max_entries}")
    return args, run_config


def main(argv=None) -> int:
    args, run_config = parse_args(list(sys.argv[1:] if argv is None else argv))
    start = time.time()
    entry_ids = eval_entry_ids(args.split, args.categories, args.max_entries)
    model, config = load_model_from_args(args, run_config)
    limits = RolloutLimits(max_steps_per_turn=args.max_steps_per_turn, max_model_calls=args.max_model_calls,
                           max_response_tokens=args.max_response_tokens, max_context_tokens=args.max_context_tokens)
    sampling = SamplingSettings(temperature=args.temperature, top_p=args.top_p)
    print(f"evaluating {len(entry_ids)} entries ({args.split}: {', '.join(args.categories)})"
          f"{' with the scripted ground truth' if args.scripted else ''}", flush=True)
    trajectories, scores, rollout = run_eval(
        model, entry_ids, limits=limits, sampling=sampling, slots=args.slots,
        max_prefill_length=args.max_prefill_length, num_workers=args.num_workers, scripted=args.scripted,
        seed=args.seed)
    run_info = {"model": args.checkpoint or args.hf_dir, "step": args.step, "split": args.split,
                "categories": args.categories, "scripted": args.scripted, "num_params": config.num_params,
                "limits": dataclasses.asdict(limits), "sampling": dataclasses.asdict(sampling),
                "rollout": rollout, "wall_s": time.time() - start}
    print(write_results(args.out, trajectories, scores, run_info))
    print(f"wrote {os.path.join(args.out, 'results.json')} and results.md in {time.time() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
