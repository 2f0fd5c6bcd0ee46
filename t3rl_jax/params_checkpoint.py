"""Save / load a model parameter pytree with Orbax, next to the architecture it belongs to.

Layout of a params checkpoint directory:
    params/              Orbax StandardCheckpointer tree (nested dict of arrays)
    model_config.json    the architecture, HF `config.json` spelling
    hf_assets/           optional small HF files (tokenizer, generation config) kept for export
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from t3rl_jax.models.model_config import Qwen3Config

PARAMS_DIR = "params"
CONFIG_FILE = "model_config.json"
ASSETS_DIR = "hf_assets"


def _pure(params) -> dict:
    if isinstance(params, nnx.Module):
        params = nnx.state(params, nnx.Param)
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    return params


def save_params(path: str | os.PathLike, params, *, config: Qwen3Config | None = None,
                assets: dict[str, str] | None = None, force: bool = False) -> None:
    """Write params (a module, an nnx.State or a pure dict of arrays) and optionally its config.

    `assets` maps a file name to a source path copied into `hf_assets/` (tokenizer files etc.). Multi-host: every
    process calls it (the params save is collective); the config and assets are written by the primary alone.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(os.path.join(path, PARAMS_DIR)) and not force:
        raise FileExistsError(f"checkpoint {path} already holds params; pass force=True to overwrite")
    os.makedirs(path, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(path, PARAMS_DIR), _pure(params), force=force)
    checkpointer.wait_until_finished()
    if jax.process_index() != 0:
        return  # the side files are one copy each; a peer writing them too races the primary's later rename
    if config is not None:
        with open(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump(config.to_hf_dict(), f, indent=2)
    if assets:
        os.makedirs(os.path.join(path, ASSETS_DIR), exist_ok=True)
        for name, src in assets.items():
            shutil.copyfile(src, os.path.join(path, ASSETS_DIR, name))


def load_config(path: str | os.PathLike) -> Qwen3Config:
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file} is missing: not a params checkpoint written with its config")
    with open(file) as f:
        return Qwen3Config.from_hf_dict(json.load(f))


def stored_dtype(path: str | os.PathLike) -> str:
    """The dtype the params of a checkpoint are stored in (e.g. 'float32'); mixed dtypes are named and refused."""
    params_dir = os.path.join(os.path.abspath(os.fspath(path)), PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise FileNotFoundError(f"{params_dir} is missing: not a params checkpoint")
    metadata = ocp.StandardCheckpointer().metadata(params_dir)
    tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
    dtypes = sorted({str(leaf.dtype) for leaf in jax.tree.leaves(tree) if hasattr(leaf, "dtype")})
    if len(dtypes) != 1:
        raise ValueError(f"{params_dir} stores params in several dtypes {dtypes}; pass the export dtype explicitly")
    return dtypes[0]


def asset_files(path: str | os.PathLike) -> dict[str, str]:
    folder = os.path.join(path, ASSETS_DIR)
    if not os.path.isdir(folder):
        return {}
    return {name: os.path.join(folder, name) for name in sorted(os.listdir(folder))}


def load_params(path: str | os.PathLike, target: Any) -> dict:
    """Restore the pure params dict shaped like `target` (arrays or jax.ShapeDtypeStruct, possibly
    carrying `.sharding`: each leaf is restored directly with that placement and dtype)."""
    path = os.path.abspath(os.fspath(path))
    params_dir = os.path.join(path, PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise FileNotFoundError(f"{params_dir} is missing: not a params checkpoint")
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                          _pure(target))
    return ocp.StandardCheckpointer().restore(params_dir, target)


def load_into_model(path: str | os.PathLike, model: nnx.Module) -> nnx.Module:
    """Load params into an (abstract or concrete) model built for the checkpoint's architecture."""
    graphdef, state = nnx.split(model)
    params = nnx.state(model, nnx.Param)
    restored = load_params(path, params)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)
