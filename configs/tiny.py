"""The tiny preset: a 2-layer random Qwen3 with the real tokenizer on two short base entries, the base of the CPU demo
(`configs/demo.py`, `make demo`) and of the end-to-end tests.

A random model never writes a tool call, so GRPO alone has nothing to reinforce: the preset first warms up on the
ground truth of its two training entries (`rl/sft.py`: teacher-forced through the real rollout path, cross-entropy
on the assistant tokens), then runs GRPO with the progress reward on the same entries. Validation replays the same
two entries greedily. The entries (`configs/splits/tiny_train.jsonl`, written with `splits.record`) are the shortest
TradingBot tasks: 3.6k-token prompts in the `t3rl` style and 3-4 turns of one call each (whole ground truth <= 4,034
tokens).
"""

import os

from configs.base import named, recipe

# An absolute path: os.path.join(data.splits_dir, it) is then the file itself, whatever splits_dir a run uses.
DEMO_ENTRIES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "splits", "tiny_train.jsonl")


def get_config():
    c = named(recipe(), "tiny")
    c.init_from = ""  # random init
    c.compilation_cache_dir = ""  # CPU compiles are quick; tests run this preset and must not write into runs/
    c.model.update(
        preset="tiny", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=128, dtype="float32", param_dtype="float32", remat="none",
    )
    c.mesh.update(fsdp=1, data=-1)
    c.data.update(train_file=DEMO_ENTRIES, val_file=DEMO_ENTRIES,
                  prompts_per_step=2, max_entries=0, categories=("base",))
    # 128 new tokens per model call (a ground-truth reply is < 60); the context holds the whole ground truth.
    c.rollout.update(
        samples_per_prompt=4, max_concurrent_decodes=8, max_prefill_length=4096, max_response_tokens=128,
        max_context_tokens=4608, max_steps_per_turn=2, max_model_calls=10, prefill_tokens_per_call=8192,
        slot_classes=(),  # one class of 8 x 4,608-token slots
    )
    c.env.update(augment=False, num_workers=2, step_timeout_s=60.0)  # generous: CI machines are shared
    # Every group trains (a filtered step with no varied group would skip its update in this short run).
    c.algo.update(filter_zero_variance=False, refill_groups=False)
    c.train.update(num_steps=12, lr=5e-4, micro_batch_size=2, max_seq_len=4608)
    c.checkpoint.update(every_steps=6, keep=2)
    c.eval.update(every_steps=12, max_entries=0, max_steps_per_turn=2, max_response_tokens=128, max_model_calls=10)
    c.warm_start.update(steps=110, lr=1e-2, max_entries=0)
    return c
