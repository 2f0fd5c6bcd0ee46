"""T3RL stage 1: Qwen3-4B-Instruct-2507 on the 100 base-split entries, 8xH200, CP=1 (T3RL's one training script).

All numbers are `configs/base.py: recipe()` (each names its anchor): 800 rollouts of 32 prompts x 16 samples,
validation on the 100 val entries every 5 steps keeping the best checkpoint.
"""

from configs.base import named, recipe


def get_config():
    return named(recipe(), "stage1", next_stage="stage2")
