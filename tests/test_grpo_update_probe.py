"""The update probe's per-episode bookkeeping (scripts/grpo_update_probe.py) against a hand-computed packed batch."""

import numpy as np

from scripts.grpo_update_probe import episode_changes, summary


def test_changes_are_per_episode_over_its_sampled_tokens_only():
    # One micro-batch, two rows: row 0 packs episodes 1 (advantage +1) and 2 (-1), row 1 holds episode 3 (-0.5)
    # and padding. Prompt / observation tokens (mask 0) move too, but must not count.
    seg = np.array([[[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 0, 0]]])
    mask = np.array([[[0, 1, 1, 0, 1, 1], [0, 1, 0, 1, 0, 0]]], np.float32)
    adv = np.where(seg[0] == 0, 0.0, np.array([[1, 1, 1, -1, -1, -1], [-.5, -.5, -.5, -.5, 0, 0]]))[None]
    before = np.zeros(seg.shape)
    after = np.array([[[9.0, 0.1, 0.3, 9.0, -0.2, -0.4], [9.0, -0.1, 9.0, -0.3, 9.0, 9.0]]])
    rows = episode_changes(before, after, {"segment_ids": seg, "loss_mask": mask, "advantages": adv}, first=1)
    np.testing.assert_allclose(rows, [[1.0, 0.2, 0.1, 2], [-1.0, -0.3, -0.2, 2], [-0.5, -0.2, -0.1, 2]])
    s = summary(rows)
    np.testing.assert_allclose([s["positive"], s["negative"], s["opening"], s["surrogate"], s["corr"]],
                               [0.2, -0.25, (0.1 - 0.2 - 0.1) / 3, 0.2 + 0.3 + 0.1,
                                np.corrcoef([1.0, -1.0, -0.5], [0.2, -0.3, -0.2])[0, 1]])
