"""The paper's curriculum, stage 2: learning with hints (base split, progress reward, augmented feedback)."""

from configs.base import paper_stage


def get_config():
    return paper_stage(2)
