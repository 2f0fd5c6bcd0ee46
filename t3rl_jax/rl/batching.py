"""Trajectories -> packed training rows.

Several trajectories share one row (segment ids 1..n, positions restarting at 0) to cut padding. Row layout is
next-token prediction: position t carries input token x[t] and target x[t+1]; the target's loss mask and rollout
log-prob move with it, so only model-sampled targets are trained on and a segment's last token predicts nothing.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class PackedBatch:
    tokens: np.ndarray          # [R, L] int32 input ids
    positions: np.ndarray       # [R, L] int32
    segment_ids: np.ndarray     # [R, L] int32, 0 = padding
    targets: np.ndarray         # [R, L] int32 next-token ids
    loss_mask: np.ndarray       # [R, L] float32, 1 where the target was sampled by the model
    rollout_logprobs: np.ndarray  # [R, L] float32 sampling log-prob of the target
    advantages: np.ndarray      # [R, L] float32, the trajectory's advantage on each of its tokens
    sequence_ids: np.ndarray    # [R, L] int32 index of the trajectory in the input list, -1 on padding
    num_truncated: int = 0

    def as_dict(self):
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "num_truncated"}


def first_fit_decreasing(lengths, capacity: int) -> list[list[int]]:
    """Bins of item indices, each bin's total length <= capacity (items longer than capacity get their own bin)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        need = min(lengths[i], capacity)
        for b, room in enumerate(free):
            if room >= need:
                bins[b].append(i)
                free[b] -= need
                break
        else:
            bins.append([i])
            free.append(capacity - need)
    return bins


def pack(trajectories, advantages, *, row_length: int, num_rows: int | None = None,
         pad_rows_to_multiple: int = 1) -> PackedBatch:
    """Pack trajectories (objects with `.arrays() -> (ids, mask, logprobs)`) into rows of `row_length` tokens.

    Sequences longer than a row are cut: their first `row_length` tokens are trained on, with the advantage of
    the whole episode (its reward came from all of it, as in verl), and counted in `num_truncated`. `num_rows` fixes the row count (error if the
    trajectories do not fit); otherwise it is the number of bins rounded up to `pad_rows_to_multiple` so the batch
    divides the data-parallel devices.
    """
    if len(trajectories) != len(advantages):
        raise ValueError(f"{len(trajectories)} trajectories but {len(advantages)} advantages")
    arrays = [t.arrays() for t in trajectories]
    lengths = [len(ids) for ids, _, _ in arrays]
    bins = first_fit_decreasing(lengths, row_length)
    rows = len(bins)
    if num_rows is not None:
        if rows > num_rows:
            raise ValueError(f"trajectories need {rows} rows of {row_length} tokens but only {num_rows} are allowed")
        rows = num_rows
    rows = -(-rows // pad_rows_to_multiple) * pad_rows_to_multiple
    shape = (rows, row_length)
    out = PackedBatch(tokens=np.zeros(shape, np.int32), positions=np.zeros(shape, np.int32),
                      segment_ids=np.zeros(shape, np.int32), targets=np.zeros(shape, np.int32),
                      loss_mask=np.zeros(shape, np.float32), rollout_logprobs=np.zeros(shape, np.float32),
                      advantages=np.zeros(shape, np.float32), sequence_ids=np.full(shape, -1, np.int32))
    for r, members in enumerate(bins):
        offset = 0
        for seg, i in enumerate(members, start=1):
            ids, mask, logp = arrays[i]
            n = min(len(ids), row_length)
            out.num_truncated += int(len(ids) > row_length)
            sl = slice(offset, offset + n)
            out.tokens[r, sl] = ids[:n]
            out.positions[r, sl] = np.arange(n)
            out.segment_ids[r, sl] = seg
            out.sequence_ids[r, sl] = i
            out.advantages[r, sl] = advantages[i]
            # Targets are the next token of the same sequence; the last token of a whole sequence has none, while
            # a cut sequence's last kept token still predicts the first token past the cut.
            m = min(len(ids) - 1, n)
            out.targets[r, offset:offset + m] = ids[1:m + 1]
            out.loss_mask[r, offset:offset + m] = mask[1:m + 1]
            out.rollout_logprobs[r, offset:offset + m] = logp[1:m + 1]
            offset += n
    return out
