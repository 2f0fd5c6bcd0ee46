"""Shared helpers: tiny random transformers Qwen3 models saved as real HF directories."""

from __future__ import annotations

import numpy as np
import torch
import transformers

TINY_HF = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rms_norm_eps=1e-6,
               rope_theta=1e6, tie_word_embeddings=True)


def make_hf_model(seed: int = 0, **overrides) -> transformers.Qwen3ForCausalLM:
    """Random-init f32 transformers Qwen3 (eager attention) from TINY_HF + overrides.

    Norm weights are randomised too (HF inits them to ones, which would hide layout bugs).
    """
    kwargs = {**TINY_HF, **overrides}
    torch.manual_seed(seed)
    config = transformers.Qwen3Config(**kwargs, attn_implementation="eager")
    model = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model


def save_hf_dir(model, path, *, max_shard_size: str = "100KB", dtype=None) -> str:
    """save_pretrained into path (sharded small by default, so index handling is exercised)."""
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return str(path)


def padded_batch(rng: np.random.Generator, vocab: int, lengths: list[int], total: int, left: list[bool]):
    """Tokens / HF attention mask / positions / segment ids for rows padded left or right."""
    b = len(lengths)
    tokens = np.zeros((b, total), np.int32)
    mask = np.zeros((b, total), np.int32)
    for i, (n, is_left) in enumerate(zip(lengths, left)):
        sl = slice(total - n, total) if is_left else slice(0, n)
        tokens[i, sl] = rng.integers(1, vocab, n)
        mask[i, sl] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return tokens, mask, positions, mask.copy()


def hf_logits(model, tokens: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                    attention_mask=torch.as_tensor(mask, dtype=torch.long),
                    position_ids=torch.as_tensor(positions, dtype=torch.long))
    return out.logits.float().numpy()
