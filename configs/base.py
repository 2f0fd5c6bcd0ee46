"""Shared recipe numbers; presets start from `recipe()` and change only what differs.

Sources (see shared/REFERENCE.md): T3RL's stage-1 script for the optimisation and sampling
numbers, the official EnvTuning code for the paper's curriculum (KL 0.1 low-var KL, 20 epochs per
stage, 8192-token prompts). This module is a helper, not a preset: it has no get_config().
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from t3rl_jax.config import export_dir

ALL_CATEGORIES = ("base", "miss_func", "miss_param", "long_context")
# Where `scripts/import_hf` (or a manual download) puts the released weights.
QWEN3_4B_INSTRUCT_2507_DIR = "checkpoints/Qwen3-4B-Instruct-2507"
BASE_SPLIT_SIZE = 100  # bfcl_train_base.jsonl
FULL_SPLIT_SIZE = 400  # bfcl_train.jsonl
EPOCHS_PER_STAGE = 20


def steps_for_epochs(num_entries: int, prompts_per_step: int, epochs: int = EPOCHS_PER_STAGE) -> int:
    return -(-num_entries * epochs // prompts_per_step)


def recipe() -> ml_collections.ConfigDict:
    """T3RL's recipe on Qwen3-4B-Instruct-2507 for one 8xH200 node (stage 1 numbers)."""
    c = ml_collections.ConfigDict()
    c.workdir = "runs/recipe"
    c.seed = 0
    c.resume = "auto"
    c.dry_run = False
    c.init_from = QWEN3_4B_INSTRUCT_2507_DIR
    c.stage = "recipe"
    c.next_stage = ""
    c.dump_hlo = False
    # XLA executables kept across runs and stages ("" = off): the 4B model's unrolled decode and prefill buckets
    # compile once per machine instead of once per run.
    c.compilation_cache_dir = "runs/.jax_cache"

    c.model = dict(
        preset="qwen3_4b_instruct_2507",
        num_layers=36,
        hidden_size=2560,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=9728,
        vocab_size=config_dict.placeholder(int),  # None: the preset's 151,936
        dtype="bfloat16",
        param_dtype="float32",  # fp32 master weights; Adam at lr 1e-6 underflows in bf16
        remat="full",
        scan_layers=True,
        # Training attention kernel (models/attention_backends.py): auto = cuDNN on CUDA, splash on TPU, the
        # blockwise kernel on CPU and under context parallelism; or cudnn / splash / blockwise / xla by name.
        attention="auto",
    )
    # 8 GPUs: FSDP across all of them; stage 2 trades some FSDP for context parallelism.
    c.mesh = dict(data=1, fsdp=-1, tensor=1, sequence=1, coordinator_address="", num_processes=1, process_id=0)
    c.data = dict(
        train_file="bfcl_train_base.jsonl",  # relative to splits_dir
        val_file="bfcl_val.jsonl",
        splits_dir="data/splits",
        prompts_per_step=32,
        shuffle=True,
        max_entries=0,
        categories=ALL_CATEGORIES,
    )
    c.rollout = dict(
        samples_per_prompt=16,
        temperature=1.0,
        top_p=1.0,
        top_k=0,  # 0 = off
        max_concurrent_decodes=128,
        # Initial BFCL prompts (tool docs + first question) are 3.1k-7.1k tokens.
        max_prefill_length=8192,
        # Everything after the first prompt (sampled tokens and tool observations), as verl counts it.
        max_response_tokens=10000,
        max_context_tokens=18432,  # 8192 + 10000, rounded up to a multiple of 1024
        max_steps_per_turn=10,
        max_model_calls=30,
        # Padded prompt tokens prefilled per engine call when several episodes start or resume together (bounds
        # prefill activation memory; a GRPO group's identical prompts count once).
        prefill_tokens_per_call=8192,
    )
    # Assumption: T3RL keeps the paper's augmented feedback on (its stages mirror the paper's 2-3).
    c.env = dict(augment=True, num_workers=32, step_timeout_s=10.0, reward="progress")
    # What episodes show the model (environments/bfcl/prompts.py): "t3rl" = T3RL's system prompt, its tool docs
    # (bfcl-eval's convert_to_tool: response schemas, float notes) and reveal message; "bfcl" = bfcl-eval's own
    # Qwen FC protocol (no system prompt, its loader's docs), the leaderboard's, for evaluation.
    c.prompt = dict(style="t3rl")
    c.algo = dict(
        advantage="grpo",
        policy_loss="ppo_clip",  # names registered in t3rl_jax/rl/registry.py, as are advantage, kl_type, loss_agg
        adv_eps=1e-6,
        clip_low=0.2,
        clip_high=0.28,
        dual_clip=3.0,  # verl applies its dual clip (clip_ratio_c = 3) in every vanilla PPO loss
        kl_coef=0.0,
        kl_type="low_var_kl",
        entropy_coef=0.001,
        loss_agg="token_mean",
        filter_zero_variance=True,
        refill_groups=False,
        max_refill_batches=8,  # extra prompt batches a step may roll out to reach data.prompts_per_step groups
        failed_episodes="exclude",  # env_failed episodes: "exclude" (left out of their group) or "drop_group"
        old_logprobs="trainer",
        tis_cap=0.0,
    )
    c.train = dict(
        num_steps=steps_for_epochs(BASE_SPLIT_SIZE, 32),
        lr=1e-6,
        lr_schedule="constant",
        warmup_steps=0,
        b1=0.9,
        b2=0.999,
        weight_decay=0.01,
        grad_clip=1.0,
        micro_batch_size=8,  # packed rows per micro-batch, one per device
        max_seq_len=18432,
        mini_batches_per_step=1,
        max_nan_steps=3,
    )
    c.checkpoint = dict(every_steps=10, keep=3, async_save=True)
    c.eval = dict(every_steps=10, split="val", max_entries=0, greedy=True, max_steps_per_turn=10, plateau_patience=0)
    c.log = dict(wandb_mode="offline", wandb_project="t3rl-jax", every_steps=1)
    c.profile = dict(start_step=5, num_steps=0, port=0)
    return c


def named(c: ml_collections.ConfigDict, stage: str, *, next_stage: str = "") -> ml_collections.ConfigDict:
    """Give a preset its stage name, its own workdir and its successor."""
    c.stage = stage
    c.workdir = f"runs/{stage}"
    c.next_stage = next_stage
    return c


def init_from_stage(c: ml_collections.ConfigDict, previous_stage: str) -> ml_collections.ConfigDict:
    """Start from the previous stage's Hugging Face export (its workdir follows `named`)."""
    c.init_from = export_dir(f"runs/{previous_stage}")
    return c


def paper_stage(number: int) -> ml_collections.ConfigDict:
    """The paper's curriculum stage `number` (1-4), chained to the next one."""
    if number not in (1, 2, 3, 4):
        raise ValueError(f"paper stages are 1..4, got {number}")
    c = named(recipe(), f"paper_stage{number}", next_stage=f"paper_stage{number + 1}" if number < 4 else "")
    if number > 1:
        init_from_stage(c, f"paper_stage{number - 1}")
    c.algo.kl_coef = 0.1  # official EnvTuning code: low-var KL 0.1
    c.eval.plateau_patience = 3  # stop a stage after 3 evaluations without a new best val accuracy
    c.eval.every_steps = 5
    if number == 1:  # mastering syntax: format reward on a small, easy set, plain feedback
        c.env.reward = "format"
        c.env.augment = False
        c.data.categories = ("base",)
        c.data.max_entries = 50
        c.train.num_steps = steps_for_epochs(50, c.data.prompts_per_step)
    elif number == 2:  # learning with hints: base split, progress reward, augmented feedback
        c.env.augment = True
    else:  # 3: hard tasks with hints; 4: the same without hints
        c.env.augment = number == 3
        c.data.train_file = "bfcl_train.jsonl"
        c.train.num_steps = steps_for_epochs(FULL_SPLIT_SIZE, c.data.prompts_per_step)
        with_long_context(c)
    if number == 3:  # the official code lets stage-3 episodes run to 24,576 tokens
        c.rollout.max_response_tokens = 24576
        c.rollout.max_context_tokens = c.train.max_seq_len = 8192 + 24576
    return c


def with_long_context(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """All four categories: long_context observations are long, so split rows over 4 GPUs (CP=4)."""
    c.mesh.sequence = 4
    return c
