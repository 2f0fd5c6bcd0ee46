"""CPU demo (`make demo`): a tiny random Qwen3 with the real tokenizer on a few short base entries.

Sized to finish in a few minutes on 2 CPU cores: 2 prompts x 4 samples per step, short episodes,
4 steps, a checkpoint every 2 steps and one greedy validation at the end.
"""

from configs.base import named, recipe


def get_config():
    c = named(recipe(), "tiny")
    c.init_from = ""  # random init
    c.compilation_cache_dir = ""  # CPU compiles are quick; tests run this preset and must not write into runs/
    c.model.update(
        preset="tiny", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=128, dtype="float32", param_dtype="float32", remat="none",
    )
    c.mesh.update(fsdp=1, data=-1)
    c.data.update(prompts_per_step=2, max_entries=4, categories=("base",))
    # The shortest base prompts are ~3.1k tokens; episodes get 256 more.
    c.rollout.update(
        samples_per_prompt=4, max_concurrent_decodes=8, max_prefill_length=4096, max_response_tokens=256,
        max_context_tokens=4352, max_steps_per_turn=2, max_model_calls=6,
    )
    c.env.update(augment=False, num_workers=2, step_timeout_s=5.0)
    # A random model's groups are almost all zero-reward; keep them so every step trains.
    c.algo.update(filter_zero_variance=False, refill_groups=False)
    c.train.update(num_steps=4, lr=1e-4, micro_batch_size=2, max_seq_len=4352)
    c.checkpoint.update(every_steps=2, keep=2)
    c.eval.update(every_steps=4, max_entries=2, max_steps_per_turn=2, max_response_tokens=256, max_model_calls=6)
    return c
