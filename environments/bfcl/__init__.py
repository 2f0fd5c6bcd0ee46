"""BFCL multi-turn environments on bfcl-eval's real API classes and data: safe execution, rewards, pool, splits.

Interface for the rollout driver
--------------------------------
catalog (`environments.bfcl.catalog`)
    entry_ids(category) / all_entry_ids()    ids per category ("base", "miss_func", "miss_param", "long_context")
    load_entry(id) -> Entry                  question turns, initial_config, involved_classes, ground_truth per
                                             turn, missed_function {turn: names}; Entry.turn_messages(t)
    tool_schemas_at(entry, turn), class_tool_schemas(cls), tool_schema(name)
                                             tools as {"type": "function", "function": {name, description,
                                             parameters}} for the Qwen <tools> block (BFCL dict->object,
                                             float->number, tuple->array, any->no type; no response schema)

Episode(entry_id, *, augment=False, reward_kind="progress", prompt_style="t3rl")      one episode, in-process
    .tools                  the style's tool docs, the same for the whole episode (`environments.bfcl.prompts`)
    .first_messages         the style's system prompt (t3rl) + user messages of turn 0; .current_messages for
                            the current turn (at a miss_func reveal turn: the style's reveal message)
    .step(calls)            calls: [{"name": str, "arguments": dict}, ...] (BFCL call strings also accepted)
                            -> one result string per call, as bfcl-eval formats them (+ "\nHint: ..." when
                            augment is on and the call failed). Whatever bfcl-eval would run runs, ill-typed
                            arguments included; only unknown tools, non-literal calls and oversized arguments
                            are refused.
    .record_text_reply()    an assistant reply without tool calls (before end_turn)
    .record_format_error(reason) -> feedback text   a reply whose calls could not be parsed
    .end_turn(cut_off=False) -> next turn's user messages, or None when the episode is over. Pass
                            cut_off=True when the driver's step limit stopped the turn (counts incorrect).
                            .revealed_tools lists the tools revealed at the new turn (in the style's form;
                            the reveal message already carries them).
    .turn_correct, .progress, .binary, .format_score, .reward (by reward_kind), .done, .result()
    .fail(reason)           score the episode as failed (all rewards 0)
    Step limits belong to the driver (T3RL: 10 replies per turn, 30 calls per episode).

EnvPool(num_workers=2, *, step_timeout_s=30, max_episodes_per_worker=256)    episodes in worker processes
    (the core builds it through `t3rl_jax.envs.make_env_pool`, and sees it through the protocol there)
    pool.open(entry_id, augment=..., reward_kind=..., prompt_style="t3rl") -> RemoteEpisode (returns at once)
    pool.wait_ready() -> raises EnvStartupError (what failed, where, the worker's traceback) if workers
    cannot start; open() raises it too once they keep failing
    RemoteEpisode.started: Future[EpisodeStart(entry_id, num_turns, tools, first_messages)]
    RemoteEpisode.step(calls) / record_text_reply() / record_format_error(reason) / end_turn(cut_off=...)
        -> Future of what Episode returns (end_turn: TurnEnd(next_messages, revealed_tools, turn_correct))
    RemoteEpisode.finish() -> Future[EpisodeResult]; always finish episodes (it frees their worker memory).
    A timed-out or crashed worker is replaced; its episodes' futures raise EpisodeFailed and finish() gives a
    failed EpisodeResult (reward 0, failure_reason set), as it does for an open the worker refused or a pool
    shut down under the episode. Episodes on other workers are not affected. num_workers=0 runs in-process with the same interface
    (no timeouts there). Workers use forkserver/spawn, never fork (the trainer runs JAX threads); a worker is
    restarted once idle after `recycle_after` episodes.

Command lines: `python -m environments.bfcl.splits --out DIR`, `python -m environments.bfcl.score --input F`.

Importing this package sets BFCL_PROJECT_ROOT (if unset) before bfcl-eval is imported, so that bfcl-eval does
not write folders into site-packages.
"""

from environments.bfcl.project_root import ensure_bfcl_project_root

ensure_bfcl_project_root()

_LAZY = {
    "Episode": "environments.bfcl.episode",
    "EpisodeResult": "environments.bfcl.episode",
    "EnvPool": "environments.bfcl.pool",
    "RemoteEpisode": "environments.bfcl.pool",
    "EpisodeFailed": "environments.bfcl.pool",
    "EnvStartupError": "environments.bfcl.pool",
}


def __getattr__(name: str):
    # Lazy, so that importing the package (e.g. in a pool worker) stays cheap and cycle-free.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'environments.bfcl' has no attribute {name!r}")
