"""The paper's curriculum, stage 3: solving hard tasks (all 400, augmented feedback)."""

from configs.base import paper_stage


def get_config():
    return paper_stage(3)
