"""cuDNN fused flash attention over packed rows (CUDA only).

cuDNN's packed ("ragged") layout takes, per row, each segment's start and length; every segment is then its
own causal sequence and tokens outside all segments (padding) are not computed. That matches `attention.attend`
on packed rows (each segment contiguous, positions increasing along it), with no [T, S] mask or bias in memory.
The segment table is built on the device from the segment ids, so the call needs no host round trip.

The packed layout is reached through jax's own cuDNN wrapper (`jax._src.cudnn.fused_attention_stablehlo`):
`jax.nn.dot_product_attention(implementation="cudnn")` exposes only one sequence length per row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from t3rl_jax.models.attention import PAD_SEGMENT

# Segments per row the layout reserves room for. Training rows hold whole trajectories (BFCL prompts alone are
# ~3k tokens), so a row of 18k tokens holds a handful; unused entries cost cuDNN empty thread blocks.
MAX_SEGMENTS = 16


def segment_table(segment_ids, max_segments: int):
    """Per-row (lengths [B, M], offsets [B, M+1]) of the non-padding runs of equal segment id, in cuDNN's
    packed-layout convention (unused entries -1), and overflow [B, T] bool: tokens of runs past the M-th.

    A run is a maximal stretch of equal, non-zero ids; a segment id that comes back after another one starts a
    new run (attend would let the two parts see each other; packed rows never do that).
    """
    b, t = segment_ids.shape
    real = segment_ids != PAD_SEGMENT
    prev = jnp.pad(segment_ids, ((0, 0), (1, 0)), constant_values=PAD_SEGMENT)[:, :-1]
    starts = real & (segment_ids != prev)
    run = jnp.cumsum(starts, axis=1) - 1  # run index of each token (meaningful where real)
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    slot = jnp.where(real, run, max_segments)  # padding goes to a dropped slot
    lengths = jnp.zeros((b, max_segments), jnp.int32).at[rows, slot].add(1, mode="drop")
    cols = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    offsets = jnp.full((b, max_segments + 1), -1, jnp.int32).at[rows, jnp.where(starts & (run < max_segments), run, max_segments + 1)].set(
        cols, mode="drop")
    used = jnp.arange(max_segments)[None] < jnp.sum(starts, axis=1, keepdims=True)
    return jnp.where(used, lengths, -1), offsets, real & (run >= max_segments)


def _assume_hopper_when_compiling_only():
    """jax's wrapper checks the packed layout against the *local* GPU's compute capability, when the custom
    VJP's forward is traced (which can be after `attend` returns). Compiling for a compile-only H100/H200 target
    on a machine without a GPU there is none, and the check would refuse; the targets we compile for are
    Hopper, so in such a process the check answers for Hopper. With a real GPU attached nothing is changed."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    if jax.default_backend() == "gpu" or getattr(fa.check_compute_capability, "_t3rl_compile_only", False):
        return

    def hopper(capability):
        return tuple(int(x) for x in capability.split(".")) <= (9, 0)

    hopper._t3rl_compile_only = True
    fa.check_compute_capability = hopper


def attend(q, k, v, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids, max_segments: int = MAX_SEGMENTS):
    """attend's contract for self-attention over packed rows. q [B, T, Hq, D], k/v [B, T, Hkv, D] in bf16/fp16.

    Padding rows return zeros and give zero gradients (cuDNN leaves them unwritten). Tokens of runs beyond
    `max_segments` return NaN, so an undersized table fails loudly instead of dropping tokens.
    """
    from jax._src.cudnn import fused_attention_stablehlo as fa

    del q_positions, kv_positions  # the packed layout's causal mask is the token order within each segment
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"cudnn attention is self-attention over packed rows: {q.shape[1]} queries but "
                         f"{k.shape[1]} keys")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"cudnn attention needs bfloat16 or float16 activations (model.dtype), got {q.dtype}")
    lengths, offsets, overflow = segment_table(q_segment_ids, max_segments)
    real_q = (q_segment_ids != PAD_SEGMENT)[:, :, None, None]
    real_kv = (kv_segment_ids != PAD_SEGMENT)[:, :, None, None]
    # Zeroed padding: cuDNN writes neither outputs nor gradients there, and `where` keeps whatever it left out
    # of the results (its backward selects zeros for those rows).
    q, k, v = jnp.where(real_q, q, 0), jnp.where(real_kv, k, 0), jnp.where(real_kv, v, 0)
    _assume_hopper_when_compiling_only()
    out = fa.dot_product_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets,
                                   kv_offsets=offsets, scale=q.shape[-1] ** -0.5,
                                   mask_type=fa.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")
    out = jnp.where(real_q, out, 0)
    return jnp.where(overflow[:, :, None, None], jnp.nan, out).astype(q.dtype)
