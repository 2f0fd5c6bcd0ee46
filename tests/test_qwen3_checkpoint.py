"""Orbax params checkpoints and the import / export / compare command-line scripts."""

import dataclasses
import importlib.util
import os

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from helpers_hf import make_hf_model, save_hf_dir
from t3rl_jax import params_checkpoint
from t3rl_jax.models import hf_io
from t3rl_jax.models.model_config import TINY
from t3rl_jax.models.qwen3 import Qwen3

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts")


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_params_roundtrip_keeps_values_config_and_dtype(tmp_path):
    cfg = dataclasses.replace(TINY, vocab_size=256, tie_word_embeddings=False)
    model = Qwen3(cfg, rngs=nnx.Rngs(0), param_dtype=jax.numpy.bfloat16)
    params_checkpoint.save_params(tmp_path / "ck", model, config=cfg)
    with pytest.raises(FileExistsError, match="already holds params"):
        params_checkpoint.save_params(tmp_path / "ck", model, config=cfg)
    assert params_checkpoint.load_config(tmp_path / "ck") == cfg
    abstract = hf_io.abstract_model(cfg, param_dtype=jax.numpy.bfloat16)
    restored = params_checkpoint.load_into_model(tmp_path / "ck", abstract)
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(restored, nnx.Param))):
        assert b.dtype == a.dtype and np.array_equal(np.asarray(a), np.asarray(b))


def test_missing_checkpoint_parts_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_config.json"):
        params_checkpoint.load_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="params"):
        params_checkpoint.load_params(tmp_path, {})


def test_cli_import_export_compare_roundtrip(tmp_path, capsys):
    hf_model = make_hf_model(seed=7, tie_word_embeddings=True)
    src = save_hf_dir(hf_model, tmp_path / "src", dtype=torch.bfloat16)
    hf_model.generation_config.save_pretrained(src)
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")

    assert _script("import_hf").main(["--hf_dir", src, "--out", ckpt]) == 0
    assert "generation_config.json" in params_checkpoint.asset_files(ckpt)
    # The import holds f32 master weights; bf16 -> f32 -> bf16 is exact, so the weights come back byte for byte.
    assert _script("export_hf").main(["--checkpoint", ckpt, "--out", out, "--max_shard_gb", "0.00002",
                                      "--dtype", "bfloat16"]) == 0
    with open(os.path.join(src, "generation_config.json")) as a, open(os.path.join(out, "generation_config.json")) as b:
        assert a.read() == b.read()
    src_t = hf_io.SafetensorsReader(src)
    out_t = hf_io.SafetensorsReader(out)
    assert sorted(src_t.weight_map) == sorted(out_t.weight_map)
    for name in src_t.weight_map:
        assert src_t.get(name).tobytes() == out_t.get(name).tobytes(), name

    compare = _script("compare_hf")
    capsys.readouterr()
    assert compare.main(["--hf_dir", out, "--checkpoint", ckpt, "--batch", "2", "--seq_len", "12"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("max_abs_diff=") and float(last.split("=")[1]) <= 1e-4

    # A checkpoint that differs from the HF weights fails the comparison.
    model = params_checkpoint.load_into_model(ckpt, hf_io.abstract_model(params_checkpoint.load_config(ckpt)))
    model.final_norm[...] = model.final_norm[...] * 1.5
    params_checkpoint.save_params(tmp_path / "perturbed", model, config=model.config)
    assert compare.main(["--hf_dir", out, "--checkpoint", str(tmp_path / "perturbed"), "--batch", "2",
                         "--seq_len", "12"]) == 1
    assert float(capsys.readouterr().out.strip().splitlines()[-1].split("=")[1]) > 1e-4


def test_export_without_assets_ships_the_real_qwen3_tokenizer(tmp_path):
    cfg = dataclasses.replace(TINY, vocab_size=256)
    params_checkpoint.save_params(tmp_path / "ck", Qwen3(cfg, rngs=nnx.Rngs(1)), config=cfg)
    assert _script("export_hf").main(["--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "out")]) == 0
    files = set(os.listdir(tmp_path / "out"))
    assert {"tokenizer.json", "config.json", "generation_config.json"} <= files
