"""The paper's curriculum, stage 4: independent solving (all 400, augmentation off)."""

from configs.base import paper_stage


def get_config():
    return paper_stage(4)
