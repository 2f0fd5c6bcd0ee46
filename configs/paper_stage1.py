"""The paper's curriculum, stage 1: mastering syntax (format reward, small easy set, plain feedback)."""

from configs.base import paper_stage


def get_config():
    return paper_stage(1)
