"""The configuration contract: required keys, allowed values and cross-field rules.

Kept apart from loading (`config.py`) so the rules read as one list. Every failure is a
`ConfigError` whose message starts with the offending dotted key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from t3rl_jax.rl import registry

SCHEMA: dict[str, tuple[str, ...] | None] = {
    "workdir": None,
    "seed": None,
    "resume": None,
    "dry_run": None,
    "init_from": None,
    "stage": None,
    "next_stage": None,
    "dump_hlo": None,
    "compilation_cache_dir": None,
    "model": ("preset", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
              "intermediate_size", "vocab_size", "dtype", "param_dtype", "remat", "scan_layers",
              "attention"),
    "mesh": ("data", "fsdp", "tensor", "sequence", "coordinator_address", "num_processes", "process_id"),
    "data": ("train_file", "val_file", "splits_dir", "prompts_per_step", "shuffle", "max_entries", "categories"),
    "rollout": ("samples_per_prompt", "temperature", "top_p", "top_k", "max_concurrent_decodes",
                "max_prefill_length", "max_response_tokens", "max_context_tokens", "max_steps_per_turn",
                "max_model_calls", "prefill_tokens_per_call", "slot_classes"),
    "prompt": ("style",),
    "env": ("augment", "num_workers", "step_timeout_s", "reward"),
    "algo": ("advantage", "policy_loss", "adv_eps", "clip_low", "clip_high", "dual_clip", "kl_coef", "kl_type",
             "entropy_coef", "loss_agg", "filter_zero_variance", "refill_groups", "max_refill_batches",
             "failed_episodes", "old_logprobs", "tis_cap"),
    "train": ("num_steps", "lr", "lr_schedule", "warmup_steps", "b1", "b2", "adam_eps", "weight_decay",
              "grad_clip", "micro_batch_size", "max_seq_len", "mini_batches_per_step", "max_nan_steps"),
    "checkpoint": ("every_steps", "keep", "async_save"),
    "eval": ("every_steps", "split", "max_entries", "greedy", "max_steps_per_turn", "max_response_tokens",
             "max_model_calls", "prompt_style", "keep_best", "plateau_patience"),
    "warm_start": ("steps", "lr", "max_entries", "until_loss", "wrong_argument_replays"),
    "log": ("wandb_mode", "wandb_project", "every_steps"),
    "profile": ("start_step", "num_steps", "port"),
}

# Allowed values (loading a config imports no JAX).
CHOICES: dict[str, tuple[Any, ...]] = {
    "resume": ("auto", "never"),
    "model.preset": ("tiny", "qwen3_4b_instruct_2507"),
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots_saveable"),
    # Mirrors t3rl_jax.models.attention_backends.BACKENDS.
    "model.attention": ("auto", "cudnn", "splash", "blockwise", "xla"),
    "env.reward": ("progress", "binary", "format"),
    "prompt.style": ("t3rl", "bfcl"),  # environments.bfcl.prompts.STYLES (tests/test_bfcl_prompts.py checks)
    # GRPO building blocks: the names registered in t3rl_jax/rl/registry.py (which imports no JAX).
    **{key: registry.names(kind) for kind, key in registry.CONFIG_KEYS.items()},
    "algo.old_logprobs": ("trainer", "rollout"),
    "algo.failed_episodes": ("exclude", "drop_group"),
    "train.lr_schedule": ("constant", "cosine"),
    "eval.split": ("val", "test"),
    "eval.prompt_style": ("t3rl", "bfcl"),
    "log.wandb_mode": ("offline", "online", "disabled"),
}
BFCL_CATEGORIES = ("base", "miss_func", "miss_param", "long_context")

# (key, lowest allowed value, whether the bound itself is allowed)
_LOWER_BOUNDS: tuple[tuple[str, float, bool], ...] = (
    ("seed", 0, True),
    ("model.num_layers", 1, True), ("model.hidden_size", 1, True), ("model.num_heads", 1, True),
    ("model.num_kv_heads", 1, True), ("model.head_dim", 1, True), ("model.intermediate_size", 1, True),
    ("mesh.num_processes", 1, True), ("mesh.process_id", 0, True),
    ("data.prompts_per_step", 1, True), ("data.max_entries", 0, True),
    ("rollout.samples_per_prompt", 2, True), ("rollout.temperature", 0, False), ("rollout.top_k", 0, True),
    ("rollout.max_concurrent_decodes", 1, True), ("rollout.max_response_tokens", 1, True),
    ("rollout.max_steps_per_turn", 1, True), ("rollout.max_model_calls", 1, True),
    ("env.num_workers", 0, True), ("env.step_timeout_s", 0, False),
    ("algo.adv_eps", 0, True), ("algo.clip_low", 0, True), ("algo.clip_high", 0, True), ("algo.kl_coef", 0, True),
    ("algo.entropy_coef", 0, True), ("algo.tis_cap", 0, True), ("algo.dual_clip", 0, True),
    ("algo.max_refill_batches", 0, True),
    ("train.num_steps", 1, True), ("train.lr", 0, False), ("train.warmup_steps", 0, True),
    ("train.b1", 0, True), ("train.b2", 0, True), ("train.adam_eps", 0, False), ("train.weight_decay", 0, True),
    ("train.grad_clip", 0, True),
    ("train.micro_batch_size", 1, True), ("train.max_seq_len", 1, True), ("train.mini_batches_per_step", 1, True),
    ("train.max_nan_steps", 1, True),
    ("checkpoint.every_steps", 0, True), ("checkpoint.keep", 1, True),
    ("eval.every_steps", 0, True), ("eval.max_entries", 0, True), ("eval.max_steps_per_turn", 1, True),
    ("eval.plateau_patience", 0, True), ("eval.max_response_tokens", 1, True), ("eval.max_model_calls", 1, True),
    ("warm_start.steps", 0, True), ("warm_start.lr", 0, False), ("warm_start.max_entries", 0, True),
    ("warm_start.until_loss", 0, True),
    ("log.every_steps", 1, True),
    ("profile.start_step", 0, True), ("profile.num_steps", 0, True), ("profile.port", 0, True),
)


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


def _get(cfg, key: str):
    value = cfg
    for part in key.split("."):
        value = value[part]
    return value


def _check_keys(cfg) -> None:
    top = set(cfg.keys())
    missing, extra = sorted(set(SCHEMA) - top), sorted(top - set(SCHEMA))
    if missing or extra:
        raise ConfigError(f"top-level config keys: missing {missing}, unexpected {extra}")
    for section, fields in SCHEMA.items():
        is_section = hasattr(cfg[section], "keys")
        if fields is None:
            if is_section:
                raise ConfigError(f"{section}: must be a value, not a section")
            continue
        if not is_section:
            raise ConfigError(f"{section}: must be a section with keys {list(fields)}")
        have = set(cfg[section].keys())
        missing, extra = sorted(set(fields) - have), sorted(have - set(fields))
        if missing or extra:
            names = lambda ks: [f"{section}.{k}" for k in ks]  # noqa: E731
            raise ConfigError(f"{section}: missing keys {names(missing)}, unexpected keys {names(extra)}")


def _require(ok: bool, key: str, message: str, cfg) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message} (got {_get(cfg, key)!r})")


def _check_slot_classes(cfg) -> None:
    """rollout.slot_classes: (slots, context_tokens) pairs, context lengths increasing, the largest holding a whole
    episode, as many slots in all as rollout.max_concurrent_decodes (rollout/slot_classes.py)."""
    r, key = cfg.rollout, "rollout.slot_classes"
    classes = tuple(r.slot_classes)
    pairs = all(isinstance(c, (tuple, list)) and len(c) == 2 and all(
        isinstance(x, int) and not isinstance(x, bool) for x in c) for c in classes)
    _require(pairs, key, "must be (slots, context_tokens) pairs of ints, e.g. ((112, 16384), (16, 49152))", cfg)
    bad = [tuple(c) for c in classes if c[0] < 1 or c[1] < 16]
    _require(not bad, key, f"every class needs slots >= 1 and context_tokens >= 16; {bad[0] if bad else ''} has "
             "not", cfg)
    lengths = [c[1] for c in classes]
    _require(lengths == sorted(set(lengths)), key, f"context_tokens must increase from class to class: {lengths}",
             cfg)
    _require(lengths[-1] >= r.max_context_tokens, key,
             f"the largest class holds {lengths[-1]} tokens < rollout.max_context_tokens={r.max_context_tokens} "
             "(every episode needs a slot that can hold it whole)", cfg)
    total = sum(c[0] for c in classes)
    _require(r.max_concurrent_decodes == total, "rollout.max_concurrent_decodes",
             f"must equal the slots of rollout.slot_classes={tuple(tuple(c) for c in classes)}: {total}", cfg)


def validate(cfg, *, known_presets: Sequence[str] | None = None) -> None:
    """Raise ConfigError naming the first key that breaks the contract."""
    _check_keys(cfg)
    for key, allowed in CHOICES.items():
        _require(_get(cfg, key) in allowed, key, f"must be one of {allowed}", cfg)
    for key, low, inclusive in _LOWER_BOUNDS:
        value = _get(cfg, key)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
            value >= low if inclusive else value > low
        )
        _require(ok, key, f"must be a number {'>=' if inclusive else '>'} {low}", cfg)

    for key in ("workdir", "stage", "data.train_file", "data.splits_dir"):
        _require(bool(_get(cfg, key)), key, "must not be empty", cfg)
    if known_presets is not None and cfg.next_stage:
        _require(cfg.next_stage in known_presets, "next_stage", f"must be '' or a preset: {list(known_presets)}", cfg)
    _require(cfg.next_stage != cfg.stage, "next_stage", "must differ from stage", cfg)

    m = cfg.model
    _require(m.vocab_size is None or m.vocab_size > 0, "model.vocab_size", "must be None or > 0", cfg)
    _require(m.num_heads % m.num_kv_heads == 0, "model.num_heads",
             f"must be a multiple of num_kv_heads={m.num_kv_heads}", cfg)
    _require(m.attention != "cudnn" or m.dtype == "bfloat16", "model.attention",
             f"'cudnn' needs model.dtype='bfloat16' (got {m.dtype!r})", cfg)

    mesh = cfg.mesh
    axes = ("data", "fsdp", "tensor", "sequence")
    for axis in axes:
        _require(mesh[axis] == -1 or mesh[axis] >= 1, f"mesh.{axis}", "must be >= 1 or -1 (fill)", cfg)
    fills = [axis for axis in axes if mesh[axis] == -1]
    if len(fills) > 1:
        raise ConfigError(f"{', '.join('mesh.' + a for a in fills)}: only one mesh axis may be -1 (fill)")
    _require(mesh.process_id < mesh.num_processes, "mesh.process_id",
             f"must be < num_processes={mesh.num_processes}", cfg)
    _require(mesh.num_processes == 1 or bool(mesh.coordinator_address), "mesh.coordinator_address",
             "is required when num_processes > 1", cfg)

    cats = cfg.data.categories
    _require(len(cats) > 0 and all(c in BFCL_CATEGORIES for c in cats), "data.categories",
             f"must be a non-empty subset of {BFCL_CATEGORIES}", cfg)

    r = cfg.rollout
    _require(0 < r.top_p <= 1, "rollout.top_p", "must be in (0, 1]", cfg)
    # Our engine buckets prefills in multiples of 16 (see rollout/extend_batch.prefill_bucket); JetStream's own server
    # needs power-of-two buckets, which scripts/serve.py picks for itself.
    _require(16 <= r.max_prefill_length <= 32768 and r.max_prefill_length % 16 == 0,
             "rollout.max_prefill_length", "must be a multiple of 16 in [16, 32768]", cfg)
    _require(r.max_context_tokens >= r.max_response_tokens, "rollout.max_context_tokens",
             f"must be >= max_response_tokens={r.max_response_tokens}", cfg)
    if r.slot_classes:
        _check_slot_classes(cfg)
    # An episode longer than train.max_seq_len trains on its first part (batching.pack cuts and counts it).

    a = cfg.algo
    _require(a.clip_low < 1, "algo.clip_low", "must be < 1 (the ratio floor 1 - clip_low must stay positive)", cfg)
    _require(a.dual_clip == 0 or a.dual_clip > 1, "algo.dual_clip", "must be 0 (off) or > 1", cfg)
    _require(not a.refill_groups or a.filter_zero_variance, "algo.refill_groups",
             "needs algo.filter_zero_variance=True", cfg)
    _require(a.tis_cap == 0 or a.old_logprobs == "trainer", "algo.tis_cap",
             "must be 0 when algo.old_logprobs='rollout' (nothing to correct)", cfg)

    t = cfg.train
    _require(t.b1 < 1, "train.b1", "must be < 1", cfg)
    _require(t.b2 < 1, "train.b2", "must be < 1", cfg)
    _require(t.warmup_steps <= t.num_steps, "train.warmup_steps", f"must be <= num_steps={t.num_steps}", cfg)
    if mesh.sequence > 1:
        # Context parallelism splits each row into 2 * sequence chunks (causal load balancing).
        _require(t.max_seq_len % (2 * mesh.sequence) == 0, "train.max_seq_len",
                 f"must be divisible by 2 * mesh.sequence = {2 * mesh.sequence}", cfg)
    _require(cfg.profile.port <= 65535, "profile.port", "must be a port number (0 = off)", cfg)
    # Validation episodes run on the training engine, whose cache holds rollout.max_context_tokens.
    _require(r.max_context_tokens >= cfg.eval.max_response_tokens, "rollout.max_context_tokens",
             f"must be >= eval.max_response_tokens={cfg.eval.max_response_tokens} (validation shares the cache)", cfg)
