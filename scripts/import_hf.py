"""HF directory (safetensors + config.json) -> Orbax params checkpoint.

    python scripts/import_hf.py --hf_dir D --out CKPT [--param_dtype float32]
"""

from __future__ import annotations

import argparse
import sys
import time

import jax.numpy as jnp

from t3rl_jax import params_checkpoint
from t3rl_jax.models import hf_io
from t3rl_jax.models.model_config import Qwen3Config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf_dir", required=True, help="local HF model directory")
    parser.add_argument("--out", required=True, help="params checkpoint directory to create")
    parser.add_argument("--param_dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")
    args = parser.parse_args(argv)
    start = time.time()
    config = Qwen3Config.from_hf_dir(args.hf_dir)
    model = hf_io.load_hf(args.hf_dir, config=config, param_dtype=jnp.dtype(args.param_dtype))
    params_checkpoint.save_params(args.out, model, config=config, assets=hf_io.asset_files(args.hf_dir),
                                  force=args.force)
    print(f"imported {config.num_params:,} parameters ({args.param_dtype}) from {args.hf_dir} to {args.out} "
          f"in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
