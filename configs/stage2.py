"""T3RL stage 2: all 400 training entries, 8xH200 with CP=4, initialised from stage 1's export.

[ours] T3RL publishes one script (stage 1, base split); this stage runs the same recipe on T3RL's full training
split (`bfcl_train.jsonl`), 20 epochs as EnvTuning's stages do.
"""

from configs.base import CONTEXT_TOKENS, FULL_SPLIT_SIZE, init_from_stage, named, recipe, steps_for_epochs
from configs.base import with_long_context


def get_config():
    c = init_from_stage(named(recipe(), "stage2"), "stage1")
    c.data.train_file = "bfcl_train.jsonl"  # [ours] T3RL's full training split (see above)
    c.train.num_steps = steps_for_epochs(FULL_SPLIT_SIZE, c.data.prompts_per_step)  # [EnvTuning] 20 epochs
    # [slime] trains on whole episodes: one row holds the longest episode; 2 rows per micro-batch (one per FSDP
    # shard, each split 4 ways by CP) keep the tokens per device at 12,288.
    c.train.max_seq_len = CONTEXT_TOKENS  # [slime] whole episodes
    c.train.micro_batch_size = 2  # [ours] memory layout
    return with_long_context(c)
