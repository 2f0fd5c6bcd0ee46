"""T3RL stage 1: Qwen3-4B-Instruct-2507 on the 100 base-split entries, 8xH200, CP=1."""

from configs.base import named, recipe


def get_config():
    return named(recipe(), "stage1", next_stage="stage2")
