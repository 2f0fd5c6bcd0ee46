"""Model FLOPs of Qwen3 training and decoding, and MFU.

Counted: the matmuls (2 FLOPs per multiply-add) of the projections, the MLP and the LM head, and attention's two
matmuls (scores QK^T and probabilities x V) over the keys each query actually sees. Not counted: norms, RoPE,
softmax, activations, the embedding gather (together well under 1% at Qwen3-4B size), and activation
recomputation (remat): MFU is *model* FLOPs per second over the peak, so recomputation lowers it, as it should.

A backward pass costs twice its forward (a gradient for the input and one for the weight of every matmul), so a
train step is 3x the forward FLOPs.

Peaks: NVIDIA's H100 SXM and H200 data sheets give BF16 Tensor Core throughput as 1,979 TFLOP/s "with sparsity";
the dense figure, the one that applies to our matmuls, is half: 989 TFLOP/s for both (H200 has the H100's compute
with more, faster memory).
"""

from __future__ import annotations

import numpy as np

from t3rl_jax.models.attention import PAD_SEGMENT
from t3rl_jax.models.model_config import Qwen3Config

PEAK_BF16_DENSE_FLOPS = {"H100": 989e12, "H200": 989e12}


def matmul_flops_per_token(cfg: Qwen3Config) -> float:
    """Forward FLOPs of every weight matmul for one token (independent of the context)."""
    e, h, k, d, m = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    per_layer = e * (h + 2 * k) * d + h * d * e + 3 * e * m  # q/k/v, o, gate/up/down
    return 2.0 * (cfg.num_layers * per_layer + e * cfg.vocab_size)


def attention_flops_per_key(cfg: Qwen3Config) -> float:
    """Forward FLOPs one query spends on one visible key, all layers: QK^T and PV, 2*D FLOPs each per head."""
    return 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim


def causal_keys(lengths) -> float:
    """Keys seen by all queries of sequences with these lengths under a causal mask: sum of L(L+1)/2."""
    lengths = np.asarray(lengths, np.float64)
    if np.any(lengths < 0):
        raise ValueError(f"sequence lengths must be >= 0, got {lengths}")
    return float(np.sum(lengths * (lengths + 1) / 2))


def forward_flops(cfg: Qwen3Config, *, tokens: float, visible_keys: float) -> float:
    """Forward FLOPs of `tokens` queries that see `visible_keys` (query, key) pairs in total."""
    return tokens * matmul_flops_per_token(cfg) + visible_keys * attention_flops_per_key(cfg)


def train_flops(cfg: Qwen3Config, *, tokens: float, visible_keys: float) -> float:
    """Forward + backward FLOPs (3x forward)."""
    return 3.0 * forward_flops(cfg, tokens=tokens, visible_keys=visible_keys)


def train_flops_per_token(cfg: Qwen3Config, seq_len: int) -> float:
    """Train FLOPs per token of one causal sequence of `seq_len` tokens."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    return train_flops(cfg, tokens=seq_len, visible_keys=causal_keys([seq_len])) / seq_len


def segment_lengths(segment_ids: np.ndarray) -> np.ndarray:
    """Lengths of the packed sequences in [rows, length] segment ids (padding, segment 0, excluded)."""
    segment_ids = np.asarray(segment_ids)
    if segment_ids.ndim != 2:
        raise ValueError(f"segment_ids must be [rows, length], got shape {segment_ids.shape}")
    lengths = []
    for row in segment_ids:
        ids, counts = np.unique(row[row != PAD_SEGMENT], return_counts=True)
        lengths.extend(counts.tolist())
    return np.asarray(lengths, np.int64)


def packed_train_flops(cfg: Qwen3Config, segment_ids: np.ndarray) -> float:
    """Model FLOPs of one train step over packed rows: real tokens only, causal within each sequence."""
    lengths = segment_lengths(segment_ids)
    return train_flops(cfg, tokens=float(lengths.sum()), visible_keys=causal_keys(lengths))


def decode_flops_per_token(cfg: Qwen3Config, context_length: float) -> float:
    """Forward FLOPs of generating one token whose query sees `context_length` cached keys (itself included)."""
    if context_length < 1:
        raise ValueError(f"context_length must be >= 1, got {context_length}")
    return forward_flops(cfg, tokens=1, visible_keys=context_length)


def peak_flops_for_device(device_kind: str, override: float = 0.0) -> float:
    """Dense BF16 peak FLOP/s for a JAX `device_kind` (e.g. 'NVIDIA H100 80GB HBM3'); `override` > 0 wins."""
    if override > 0:
        return float(override)
    for name, peak in PEAK_BF16_DENSE_FLOPS.items():
        if name in device_kind.upper():
            return peak
    raise ValueError(f"no known peak FLOP/s for device {device_kind!r} (known: {', '.join(PEAK_BF16_DENSE_FLOPS)});"
                     " pass the peak explicitly")


def mfu(achieved_flops_per_second: float, peak_flops_per_second: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the hardware peak (per device, or both totals)."""
    if peak_flops_per_second <= 0:
        raise ValueError(f"peak FLOP/s must be > 0, got {peak_flops_per_second}")
    return achieved_flops_per_second / peak_flops_per_second
