"""T3RL stage 2: all 400 training entries, 8xH200 with CP=4, initialised from stage 1's export."""

from configs.base import FULL_SPLIT_SIZE, init_from_stage, named, recipe, steps_for_epochs, with_long_context


def get_config():
    c = init_from_stage(named(recipe(), "stage2"), "stage1")
    c.data.train_file = "bfcl_train.jsonl"
    c.train.num_steps = steps_for_epochs(FULL_SPLIT_SIZE, c.data.prompts_per_step)
    return with_long_context(c)
