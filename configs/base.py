"""Shared recipe numbers; presets start from `recipe()` and change only what differs.

Every setting names its anchor (shared/REFERENCE.md, "Recipe fidelity"):
  [T3RL script]  T3RL's `scripts/train/run_bfcl_qwen3_4b.sh` (slime flags, e.g. --rollout-max-response-len)
  [T3RL code]    T3RL's hooks: `t3rl/agents/bfcl.py`, `t3rl/envs/bfcl*.py`, `t3rl/interaction/driver.py`
  [slime]        slime v0.2.2 defaults that T3RL leaves unchanged
  [EnvTuning]    the paper's official code, `EnvTuning/` in inclusionAI/AWorld-RL (a verl 0.4.1 fork)
  [bfcl-eval]    bfcl-eval 2026.3.23 (the leaderboard's harness)
  [ours]         a deliberate difference, with the reason next to it
This module is a helper, not a preset: it has no get_config().
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
EPOCHS_PER_STAGE = 20  # [EnvTuning] trainer.total_epochs per stage
# Episode token cap of every real preset. Ground-truth replays (scripted path, real tokenizer and chat format,
# measured 2026-12, HANDOFF.md): all 400 held-out entries <= 42,327 tokens (long_context_117), all 400 training
# entries but one <= 43,734; base / miss_* entries <= 5,700. 48k leaves ~6.8k tokens for the longer `t3rl` tool
# docs (+~1.7k) and the model's own words. The training entry long_context_113 (70,535 tokens: two ~31.7k
# `get_stock_info` results) cannot finish inside it; its episodes end at the context limit. [ours]: T3RL has no cap
# below the model's 262k; EnvTuning's max_model_len 32,768 would cut 17 held-out ground truths short.
CONTEXT_TOKENS = 49152
# KV cache bytes per token of Qwen3-4B in bf16: 2 (K, V) x 36 layers x 8 kv heads x 128 x 2 bytes = 147,456.
# Slot classes by context length [ours] (rollout/slot_classes.py; `python scripts/fit_check.py --config=PRESET
# --target=h200`, BENCHMARKS.md): one class of 64 x 49,152-token slots reserved the longest context for every
# episode (464 GB). base / miss_* episodes stay short (prompts 3.1k-4.9k tokens, ground truths <= 5.7k), so most
# slots hold 16,384 tokens (a prompt and a whole 10k-token reply) and a few the whole episode cap; an episode that
# outgrows its slot is moved (its cache copied) into a larger one. 192 x 16,384 + 32 x 49,152 = 4.7M tokens, 87 GB
# per H200 (slots split over all 8): stage 1 measured 115 GB at the colocated peak (limit 120). 224 slots, 3.5x
# the previous 64, for 512 episodes a step; the 32 long slots take the rare episode that runs past 16k.
SLOT_CLASSES = ((192, 16384), (32, 49152))
# With long_context entries (a quarter of the prompts, ground truths up to ~42k): a middle class for the long ones
# that stay under 32k and as many 49,152-token slots; 4.2M tokens, 77 GB per H200; 160 slots (stage2 105.3 GB,
# paper_stage3 107.3 GB at the peak). No class of exactly 16 slots: its 16-row extend took a 78 GiB temporary.
LONG_CONTEXT_SLOT_CLASSES = ((96, 16384), (32, 32768), (32, 49152))
DECODE_SLOTS = sum(slots for slots, _ in SLOT_CLASSES)


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
    # [ours] 8 GPUs: FSDP across all of them; stage 2 trades some FSDP for context parallelism.
    c.mesh = dict(data=1, fsdp=-1, tensor=1, sequence=1, coordinator_address="", num_processes=1, process_id=0)
    c.data = dict(
        train_file="bfcl_train_base.jsonl",  # [T3RL script] TRAIN_DATA; relative to splits_dir
        val_file="bfcl_val.jsonl",
        splits_dir="data/splits",
        prompts_per_step=32,  # [T3RL script] --rollout-batch-size 32
        shuffle=True,
        max_entries=0,
        categories=ALL_CATEGORIES,  # [T3RL script] every category the split file holds
    )
    c.rollout = dict(
        samples_per_prompt=16,  # [T3RL script] --n-samples-per-prompt 16
        temperature=1.0,  # [T3RL script] --rollout-temperature 1.0
        top_p=1.0,  # [slime] --rollout-top-p 1.0 (T3RL sets none)
        top_k=0,  # [slime] --rollout-top-k -1: no truncation (0 = off here)
        max_concurrent_decodes=DECODE_SLOTS,  # [ours] the slot classes' total (see SLOT_CLASSES); SGLang pages it
        # Initial BFCL prompts (tool docs + first question) are 3.1k-4.9k tokens.
        max_prefill_length=8192,  # [EnvTuning] max_prompt_length 8192
        max_response_tokens=10000,  # [T3RL script] --rollout-max-response-len 10000: new tokens per model call
        max_context_tokens=CONTEXT_TOKENS,  # [ours] the episode's only token cap (see CONTEXT_TOKENS)
        max_steps_per_turn=10,  # [T3RL code] 10 tool steps per user turn, then the answer
        max_model_calls=30,  # [T3RL code] model calls per episode
        # [ours] padded prompt tokens prefilled per engine call when several episodes start or resume together (bounds
        # prefill activation memory; a GRPO group's identical prompts count once).
        prefill_tokens_per_call=8192,
        # [ours] ((slots, context_tokens), ...) (see SLOT_CLASSES): an episode starts in the smallest class with a free
        # slot and moves up when it outgrows its slot; max_concurrent_decodes must be the classes' total. () = one
        # class of max_concurrent_decodes x max_context_tokens.
        slot_classes=SLOT_CLASSES,
    )
    c.prompt = dict(style="t3rl")  # [T3RL code] its system prompt and bfcl-eval's convert_to_tool tool docs
    c.env = dict(
        augment=False,  # [T3RL code] unmodified bfcl-eval classes, no hints
        num_workers=32,  # [ours] environment worker processes (T3RL steps its envs in the rollout workers)
        step_timeout_s=10.0,  # [ours] a tool step that hangs longer fails its episode (env_failed)
        reward="progress",  # [T3RL code] correct turns / total turns
    )
    c.algo = dict(
        advantage="grpo",  # [slime] (r - mean) / (std + eps)
        policy_loss="ppo_clip",  # [slime] PPO clipped surrogate; names registered in t3rl_jax/rl/registry.py, as are advantage, kl_type, loss_agg
        adv_eps=1e-6,  # [slime] (r - mean) / (std + 1e-6)
        clip_low=0.2,  # [T3RL script] --eps-clip 0.2
        clip_high=0.28,  # [T3RL script] --eps-clip-high 0.28
        dual_clip=0.0,  # [slime] no dual clip
        kl_coef=0.0,  # [T3RL script] --kl-loss-coef 0.00
        kl_type="low_var_kl",  # [T3RL script] --kl-loss-type low_var_kl (unused at coefficient 0)
        entropy_coef=0.001,  # [T3RL script] --entropy-coef 0.001
        loss_agg="seq_mean_token_mean",  # [slime] token mean per sequence, then the mean over sequences
        # [T3RL script] --dynamic-sampling-filter-path ...check_reward_nonzero_std: groups without reward variance
        # are dropped and slime keeps rolling out until prompts_per_step groups have it.
        filter_zero_variance=True,
        refill_groups=True,  # [T3RL script] dynamic sampling refills (see above)
        # [ours] at most this many extra prompt batches a step rolls out to reach data.prompts_per_step groups
        max_refill_batches=8,
        failed_episodes="exclude",  # [ours] env_failed episodes: "exclude" (left out of their group) or "drop_group"
        old_logprobs="trainer",  # [slime] the trainer recomputes the old log-probs (--use-rollout-logprobs off)
        tis_cap=0.0,  # [slime] no truncated importance sampling (--use-tis off)
    )
    c.train = dict(
        num_steps=800,  # [T3RL script] --num-rollout 800
        lr=1e-6,  # [T3RL script] --lr 1e-6
        lr_schedule="constant",  # [T3RL script] --lr-decay-style constant
        warmup_steps=0,  # [slime] --lr-warmup-iters 0
        b1=0.9,  # [T3RL script] --adam-beta1 0.9 --adam-beta2 0.999
        b2=0.999,  # [T3RL script] --adam-beta2 0.999
        adam_eps=1e-8,  # [slime] --adam-eps 1e-8 (Megatron's default; T3RL's script does not set it)
        weight_decay=0.01,  # [T3RL script] --weight-decay 0.01
        grad_clip=1.0,  # [T3RL script] --clip-grad 1.0
        micro_batch_size=8,  # [ours] packed rows per micro-batch, one per device (memory layout, not the recipe)
        # [ours] training row: base-split episodes (<= 5.7k tokens) are never cut. A longer episode trains on its first
        # max_seq_len tokens and keeps the whole episode's reward (as verl does); counted in
        # length/truncated_episodes.
        max_seq_len=18432,
        mini_batches_per_step=1,  # [T3RL script] --global-batch-size 512 = one optimizer step per rollout
        max_nan_steps=3,  # [ours] consecutive non-finite updates skipped before the run stops
    )
    c.checkpoint = dict(every_steps=20, keep=3, async_save=True)  # [T3RL script] --save-interval 20
    c.eval = dict(
        every_steps=5,  # [T3RL script] --eval-interval 5
        split="val",  # [T3RL script] --eval-prompt-data bfcl bfcl_val.jsonl (100 entries)
        max_entries=0,
        # [ours] greedy: a deterministic score for keeping the best checkpoint (T3RL: --n-samples-per-eval-prompt
        # 1 at the rollout temperature 1.0).
        greedy=True,
        max_steps_per_turn=10,  # [T3RL code] as in training
        max_response_tokens=20000,  # [T3RL script] --eval-max-response-len 20000 per model call
        max_model_calls=30,  # [T3RL code]
        prompt_style="t3rl",  # [T3RL code] validated in its own rollout format; scripts/eval_bfcl.py uses bfcl
        keep_best=True,  # [ours] keep the checkpoint with the best validation accuracy (never rotated out)
        plateau_patience=0,  # [T3RL script] runs all --num-rollout steps
    )
    # Supervised warm start on ground-truth trajectories of training entries before GRPO step 0 (0 = off; only
    # the CPU demo uses it: a random model never calls a tool, so GRPO alone has no signal).
    # `until_loss` > 0 ends it early, once a pass over its micro-batches averages at most that loss: the sampled
    # reward GRPO starts from follows the warm start's final loss far more closely than its step count.
    # `wrong_argument_replays`: also replay each entry with one argument value wrong in every call
    # (`rollout/scripted.wrong_argument_reply`) and train on both, so the demonstrations disagree exactly at the
    # values and only the reward can tell which is right.
    c.warm_start = dict(steps=0, lr=1e-3, max_entries=0, until_loss=0.0, wrong_argument_replays=False)
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
    """The paper's curriculum stage `number` (1-4), chained to the next one.

    T3RL's recipe with EnvTuning's loss settings and per-stage data / reward / feedback / training rows."""
    if number not in (1, 2, 3, 4):
        raise ValueError(f"paper stages are 1..4, got {number}")
    c = named(recipe(), f"paper_stage{number}", next_stage=f"paper_stage{number + 1}" if number < 4 else "")
    if number > 1:
        init_from_stage(c, f"paper_stage{number - 1}")
    c.algo.kl_coef = 0.1  # [EnvTuning] use_kl_loss, kl_loss_coef 0.1, low_var_kl
    c.algo.kl_type = "low_var_kl"
    c.algo.dual_clip = 10.0  # [EnvTuning] clip_ratio_c 10
    c.algo.loss_agg = "token_mean"  # [EnvTuning] verl's default loss_agg_mode token-mean
    c.rollout.max_steps_per_turn = 5  # [EnvTuning] 5 tool steps per user turn
    c.eval.max_steps_per_turn = 5  # [EnvTuning] as in training
    c.eval.plateau_patience = 3  # [ours] the paper moves on "when validation accuracy stabilises": 3 evaluations
    # [EnvTuning] the training tensor holds the prompt (8192) + the first 10,000 response tokens, 24,576 in stages
    # 3-4; the reward still comes from the whole episode (see CONTEXT_TOKENS for the episode cap).
    c.train.max_seq_len = 8192 + 10240
    if number == 1:  # mastering syntax: format reward on a small, easy set, plain feedback
        c.env.reward = "format"  # [EnvTuning] bfcl_reward.py, stage 1: is_tool_call * (format + tool_call), 0..2
        c.env.augment = False  # [EnvTuning] standard feedback in stage 1
        c.data.categories = ("base",)  # [EnvTuning] an easy set: base entries
        c.data.max_entries = 50  # [ours] the paper gives no size for its small stage-1 set
        c.train.num_steps = steps_for_epochs(50, c.data.prompts_per_step)  # [EnvTuning] 20 epochs a stage
    elif number == 2:  # learning with hints: base split, progress reward, augmented feedback
        c.env.augment = True  # [EnvTuning] augmented feedback
        c.train.num_steps = steps_for_epochs(BASE_SPLIT_SIZE, c.data.prompts_per_step)  # [EnvTuning] 20 epochs
    else:  # 3: hard tasks with hints; 4: the same without hints, with stage 3's budgets
        c.env.augment = number == 3  # [EnvTuning] hints in stage 3, none in stage 4
        c.data.train_file = "bfcl_train.jsonl"  # [EnvTuning] all 400 training entries
        c.train.num_steps = steps_for_epochs(FULL_SPLIT_SIZE, c.data.prompts_per_step)  # [EnvTuning] 20 epochs
        c.train.max_seq_len = 8192 + 24576  # [EnvTuning] prompt 8192 + response 24,576 in stages 3-4
        with_long_context(c)
    return c


def with_long_context(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """All four categories: long_context observations are long, so split rows over 4 GPUs (CP=4), and more slots
    of long contexts (see LONG_CONTEXT_SLOT_CLASSES)."""
    c.mesh.sequence = 4  # [ours] CP=4 for T3RL stage 2 and the long_context stages (rows up to 48k tokens)
    c.rollout.slot_classes = LONG_CONTEXT_SLOT_CLASSES  # [ours] sized by the H200 fit check
    c.rollout.max_concurrent_decodes = sum(slots for slots, _ in LONG_CONTEXT_SLOT_CLASSES)  # [ours] the classes' total
    return c
