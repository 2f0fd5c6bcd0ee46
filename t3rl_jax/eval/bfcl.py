"""BFCL multi-turn evaluation: one function for training-time validation and for `scripts/eval_bfcl.py`.

    report = evaluate(engine=..., pool=..., chat=..., entry_ids=held_out_entry_ids("all"),
                      limits=protocol_limits("bfcl"), sampling=GREEDY, prompt_style="bfcl", seed=0,
                      cross_check=True)
    report.scores["accuracy/overall"], report.agreement

Every entry is one episode on the same engine, driver, environments and per-turn scoring as training, never with
hints (hints are a training device). With `cross_check`, each episode's executed calls are rebuilt from its tokens
and bfcl-eval's own `multi_turn_checker` judges them (`bfcl_checker.py`); `agreement` is the share of entries where
its verdict on every prefix of turns equals ours. Before anything runs, every entry is checked to exist and its
prompt to fit the context (`check_budget`), with an error naming the key, the entry and the numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Sequence

# bfcl-eval's leaderboard harness: tool steps per user turn before it forces the turn to quit.
from bfcl_eval.constants.default_prompts import MAXIMUM_STEP_LIMIT as BFCL_STEP_LIMIT

from environments.bfcl import catalog, splits
from t3rl_jax import distributed
from t3rl_jax.chat_format import ChatEncoder
from t3rl_jax.evaluation import category_of, score_trajectories
from t3rl_jax.eval import bfcl_checker
from t3rl_jax.envs.base import local_episode
from t3rl_jax.rollout.driver import EpisodeRequest, RolloutDriver, RolloutLimits
from t3rl_jax.rollout.scripted import ground_truth_reply
from t3rl_jax.rollout.trajectory import Trajectory
from t3rl_jax.tool_calls import parse_reply_ids

SPLITS = ("test", "val", "all")
PROTOCOLS = ("bfcl", "t3rl")

# Evaluation context: every held-out ground-truth replay fits (longest 42,327 tokens; configs/base.py).
EVAL_CONTEXT_TOKENS = 49152
EVAL_RESPONSE_TOKENS = 20000  # T3RL --eval-max-response-len: new tokens per model call
EVAL_MODEL_CALLS = 200  # bfcl-eval has no cap per episode besides its per-turn step limit


@dataclasses.dataclass
class EvalReport:
    scores: dict[str, float]
    trajectories: list[Trajectory]
    agreement: float | None = None  # share of entries where bfcl-eval's checker agrees on every turn prefix
    disagreements: list[dict] = dataclasses.field(default_factory=list)
    rollout: dict[str, float] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- limits
def make_limits(*, max_steps_per_turn: int, max_model_calls: int, max_response_tokens: int,
                max_context_tokens: int, prefill_tokens_per_call: int | None = None) -> RolloutLimits:
    """The one mapping from evaluation settings to the driver's limits."""
    extra = {} if prefill_tokens_per_call is None else {"prefill_tokens_per_call": prefill_tokens_per_call}
    return RolloutLimits(max_steps_per_turn=max_steps_per_turn, max_model_calls=max_model_calls,
                         max_response_tokens=max_response_tokens, max_context_tokens=max_context_tokens, **extra)


def protocol_limits(protocol: str, *, max_context_tokens: int = EVAL_CONTEXT_TOKENS,
                    max_response_tokens: int = EVAL_RESPONSE_TOKENS) -> RolloutLimits:
    """`bfcl`: bfcl-eval's step limit per turn; `t3rl`: T3RL's 10 steps and 30 model calls."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    steps, calls = (BFCL_STEP_LIMIT, EVAL_MODEL_CALLS) if protocol == "bfcl" else (10, 30)
    return make_limits(max_steps_per_turn=steps, max_model_calls=calls, max_response_tokens=max_response_tokens,
                       max_context_tokens=max_context_tokens)


def validation_limits(cfg) -> RolloutLimits:
    """Training-time validation: the run's `eval.*` limits on the training engine's context."""
    return make_limits(max_steps_per_turn=cfg.eval.max_steps_per_turn, max_model_calls=cfg.eval.max_model_calls,
                       max_response_tokens=cfg.eval.max_response_tokens,
                       max_context_tokens=cfg.rollout.max_context_tokens,
                       prefill_tokens_per_call=cfg.rollout.prefill_tokens_per_call)


# ---------------------------------------------------------------------------------------------- entries
def held_out_entry_ids(split: str = "all", categories: Sequence[str] = catalog.CATEGORIES,
                       max_entries: int | None = None) -> list[str]:
    """Entry ids of a T3RL split (`all` = val + test: the 400 T3RL holds out), category by category, lowest
    numeric ids first; at most `max_entries` per category."""
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


def check_entries_exist(entry_ids: Sequence[str], *, source: str) -> None:
    """Every id names a BFCL multi-turn entry; else an error naming the source, the entry and its position."""
    known = set(catalog.all_entry_ids())
    for position, entry_id in enumerate(entry_ids, 1):
        if entry_id not in known:
            raise ValueError(f"{source}: entry {position} names unknown BFCL entry {entry_id!r} "
                             f"({len(known)} multi-turn entries exist, e.g. {min(known)!r})")


@functools.lru_cache(maxsize=4096)
def ground_truth_tokens(entry_id: str, chat: ChatEncoder, prompt_style: str = "t3rl") -> tuple[int, int]:
    """(prompt tokens, whole-episode tokens) of a perfect ground-truth replay in `prompt_style`, counted as the
    driver builds the trajectory (prompt, one reply per ground-truth step, tool-response and next-turn deltas, the
    reveal message as the environment words it); no model runs."""
    episode = local_episode(entry_id, prompt_style=prompt_style)
    prompt = total = len(chat.prompt_ids(episode.first_messages, episode.tools))
    turn = 0
    while True:
        step = 0
        while True:
            reply = ground_truth_reply(entry_id, turn, step)
            total += len(chat.assistant_ids(reply))
            step += 1
            if not reply.get("tool_calls"):
                episode.record_text_reply()
                break
            results = episode.step([dict(c) for c in reply["tool_calls"]])
            total += len(chat.delta_ids([{"role": "tool", "content": r} for r in results]))
        messages = episode.end_turn()
        turn += 1
        if messages is None:
            return prompt, total
        total += len(chat.delta_ids([dict(m) for m in messages]))


@functools.lru_cache(maxsize=4096)
def prompt_tokens(entry_id: str, chat: ChatEncoder, prompt_style: str) -> int:
    """Tokens of the first prompt an episode of `entry_id` shows in `prompt_style` (system prompt and tool docs
    included): what the prefill must hold."""
    episode = local_episode(entry_id, prompt_style=prompt_style)
    return len(chat.prompt_ids(episode.first_messages, episode.tools))


def check_budget(entry_ids: Sequence[str], chat: ChatEncoder, limits: RolloutLimits, *, prompt_style: str = "t3rl",
                 key: str = "max_context_tokens") -> dict[str, str]:
    """Raise if an entry's first prompt cannot fit the context (naming `key`, the entry and the numbers); return the
    entries whose ground-truth replay would not fit, with the reason (they still run, and are listed)."""
    excluded = {}
    for entry_id in entry_ids:
        prompt = prompt_tokens(entry_id, chat, prompt_style)
        if prompt + 1 >= limits.max_context_tokens:
            raise ValueError(f"{key}={limits.max_context_tokens} cannot hold the prompt of {entry_id} "
                             f"({prompt} tokens plus at least one reply token)")
        if catalog.parse_entry_id(entry_id)[0] == "long_context" or prompt > limits.max_context_tokens // 2:
            _, total = ground_truth_tokens(entry_id, chat, prompt_style)
            if total > limits.max_context_tokens:
                excluded[entry_id] = (f"ground-truth replay needs {total} tokens > {key}="
                                      f"{limits.max_context_tokens}")
    return excluded


# ---------------------------------------------------------------------------------------------- evaluation
def entry_seed(seed: int, entry_id: str) -> int:
    """Sampling seed of one evaluation episode: a pure function of (seed, entry)."""
    digest = hashlib.blake2b(f"eval/{seed}/{entry_id}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def eval_requests(entry_ids: Sequence[str], *, seed: int, prompt_style: str) -> list[EpisodeRequest]:
    return [EpisodeRequest(e, group_id=i, sample_index=0, seed=entry_seed(seed, e), augment=False,
                           reward_kind="progress", category=category_of(e), prompt_style=prompt_style)
            for i, e in enumerate(entry_ids)]


def evaluate(*, engine, pool, chat: ChatEncoder, entry_ids: Sequence[str], limits: RolloutLimits, sampling,
             prompt_style: str, seed: int, cross_check: bool = False, script=None, params=None,
             check_budget_first: bool = True) -> EvalReport:
    """One episode per entry (in order), scored per category; hints are never added.

    `script` teacher-forces replies (e.g. `ground_truth_reply`) instead of sampling; `params` defaults to the
    engine's."""
    if prompt_style not in PROTOCOLS:
        raise ValueError(f"unknown prompt style {prompt_style!r}; expected one of {PROTOCOLS}")
    entry_ids = list(entry_ids)
    check_entries_exist(entry_ids, source="evaluation entries")
    excluded = check_budget(entry_ids, chat, limits, prompt_style=prompt_style) if check_budget_first else {}
    driver = RolloutDriver(engine, pool, chat, limits=limits, sampling=sampling, script=script)
    # Multi-host: each process runs its share of the entries and every process scores all of them.
    trajectories = distributed.run_shared(lambda mine: driver.run(mine, params),
                                          eval_requests(entry_ids, seed=seed, prompt_style=prompt_style))
    scores = score_trajectories(trajectories)
    scores["entries/over_context"] = float(len(excluded))
    report = EvalReport(scores=scores, trajectories=trajectories, rollout=driver.metrics.summary())
    for t in trajectories:
        if t.entry_id in excluded:
            t.extras["over_context"] = excluded[t.entry_id]
    if cross_check:
        report.agreement, report.disagreements = cross_check_with_bfcl(trajectories, chat)
        scores["bfcl_checker_agreement"] = report.agreement
    return report


# ---------------------------------------------------------------------------------------------- cross-check
def _segments(traj: Trajectory):
    """(reply token ids, the observation token ids that follow) for each model reply, in order; a reply rewritten
    into bfcl-eval's history form is read in that form (the calls bfcl-eval's handler would have run)."""
    spans = list(traj.reply_spans)
    ends = [s for s, _ in spans[1:]] + [traj.length]
    return [(traj.token_ids[a:b], traj.token_ids[b:e]) for (a, b), e in zip(spans, ends)]


def executed_turns(traj: Trajectory, chat: ChatEncoder) -> list[list[list[str]]]:
    """The calls each reply had executed, grouped into steps and turns, as BFCL call strings (bfcl-eval's
    `multi_turn_model_result_list_decoded` shape). A reply's calls ran when it parsed (or when tool responses
    follow it); a turn ends after a reply without calls, or where a new user message follows executed calls
    (a turn cut off at the step limit)."""
    entry = catalog.load_entry(traj.entry_id)
    known = {n for cls in entry.involved_classes for n in catalog.class_tool_names(cls)}
    tokenizer = chat.tokenizer
    turns: list[list[list[str]]] = [[]]
    segments = _segments(traj)
    for index, (reply_ids, obs_ids) in enumerate(segments):
        reply = parse_reply_ids(reply_ids, tokenizer)
        obs = tokenizer.decode(obs_ids) if obs_ids else ""
        responded = "<tool_response>" in obs
        last = index == len(segments) - 1
        ran = bool(reply.tool_calls) and reply.finish_reason != "truncated" and (reply.ok or responded)
        if ran:
            step = [bfcl_checker.safe_call_string(c.name, c.arguments, known) for c in reply.tool_calls]
            turns[-1].append([s for s in step if s is not None])
            ends_turn = not responded and not last
        elif reply.ok and reply.finish_reason != "truncated":
            ends_turn = not last  # a plain answer closes the turn
        else:
            ends_turn = False  # format feedback follows; the turn goes on
        if ends_turn:
            turns.append([])
    return turns[:entry.num_turns]


def cross_check_with_bfcl(trajectories: Sequence[Trajectory], chat: ChatEncoder) -> tuple[float, list[dict]]:
    """Share of episodes whose per-turn results bfcl-eval's multi_turn_checker confirms, and the disagreements.

    bfcl-eval stops at the first failing turn, so its verdict on prefix k must equal "every turn <= k with ground
    truth is correct" in ours (turns with empty ground truth are skipped by bfcl-eval and not compared)."""
    items, mismatches = [], []
    for t in trajectories:
        items.append((t.entry_id, executed_turns(t, chat)))
    verdicts = bfcl_checker.check_entries(items)
    for t, (_, turns), theirs in zip(trajectories, items, verdicts):
        entry = catalog.load_entry(t.entry_id)
        ours = list(t.turn_correct) + [False] * (entry.num_turns - len(t.turn_correct))
        running, expected = True, []
        for k in range(entry.num_turns):
            if entry.ground_truth[k]:
                running = running and ours[k]
            expected.append(running)
        if expected != theirs:
            mismatches.append({"entry_id": t.entry_id, "ours": expected, "bfcl": theirs, "calls": turns})
    agreement = 1.0 - len(mismatches) / len(trajectories) if trajectories else 1.0
    return agreement, mismatches
