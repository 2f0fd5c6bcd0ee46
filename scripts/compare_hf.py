"""Logits parity: transformers (PyTorch, float32) vs our Qwen3 (float32) on a padded random batch.

    python scripts/compare_hf.py --hf_dir D [--checkpoint CKPT] [--batch 4] [--seq_len 64] [--tolerance 1e-4]

Prints the max |diff| per position over the batch's real tokens and, last,
`max_abs_diff=<float>`; exits 1 when that exceeds the tolerance.
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np


def padded_random_batch(seed: int, batch: int, seq_len: int, vocab: int):
    """Even rows right-padded, odd rows left-padded, real lengths in [seq_len/2, seq_len]."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((batch, seq_len), np.int32)
    mask = np.zeros((batch, seq_len), np.int32)
    for i in range(batch):
        n = int(rng.integers(max(1, seq_len // 2), seq_len + 1))
        sl = slice(0, n) if i % 2 == 0 else slice(seq_len - n, seq_len)
        tokens[i, sl] = rng.integers(0, vocab, n)
        mask[i, sl] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return tokens, mask, positions


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf_dir", required=True)
    parser.add_argument("--checkpoint", default=None, help="compare these params instead of the HF weights")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args(argv)

    import torch
    import transformers

    from t3rl_jax import params_checkpoint
    from t3rl_jax.models import hf_io

    reference = transformers.AutoModelForCausalLM.from_pretrained(
        args.hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    if args.checkpoint:
        config = params_checkpoint.load_config(args.checkpoint)
        ours = params_checkpoint.load_into_model(args.checkpoint, hf_io.abstract_model(config))
    else:
        ours = hf_io.load_hf(args.hf_dir)
    tokens, mask, positions = padded_random_batch(args.seed, args.batch, args.seq_len, ours.config.vocab_size)
    with torch.no_grad():
        want = reference(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                         attention_mask=torch.as_tensor(mask, dtype=torch.long),
                         position_ids=torch.as_tensor(positions, dtype=torch.long)).logits.float().numpy()
    got = np.asarray(jax.jit(ours)(tokens, positions, mask))
    diff = np.where(mask[..., None].astype(bool), np.abs(got - want), 0.0).max(axis=-1)  # [B, T]
    per_position = diff.max(axis=0)
    print(f"batch={args.batch} seq_len={args.seq_len} real tokens={int(mask.sum())} "
          f"logit scale={np.abs(want[mask.astype(bool)]).max():.3g}")
    print("max |diff| per position (over the batch's real tokens):")
    for start in range(0, args.seq_len, 8):
        row = " ".join(f"{v:.1e}" for v in per_position[start:start + 8])
        print(f"  pos {start:5d}-{min(start + 7, args.seq_len - 1):5d}: {row}")
    worst = float(diff.max())
    status = "OK" if worst <= args.tolerance else "FAIL"
    print(f"{status}: tolerance {args.tolerance:g}")
    print(f"max_abs_diff={worst:.6e}")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
