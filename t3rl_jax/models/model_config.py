"""Qwen3 architecture: a frozen dataclass, named presets, and Hugging Face `config.json` parsing.

Only the architecture lives here (what a checkpoint needs to be read back). Runtime choices such
as dtypes, layer scanning and rematerialisation are constructor arguments of the model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

# RoPE variants whose frequencies do not depend on the sequence length (so they can be
# precomputed); "dynamic" and "longrope" rescale with the input length and are refused.
SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn", "llama3")

# HF config keys that carry no architectural meaning for inference/training here.
_IGNORED_HF_KEYS = frozenset({
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "initializer_range", "max_window_layers", "pad_token_id", "_name_or_path", "name_or_path",
    "output_attentions", "output_hidden_states", "return_dict", "use_return_dict", "id2label", "label2id",
    "is_encoder_decoder", "tokenizer_class", "problem_type", "chunk_size_feed_forward", "torchscript",
    "tie_encoder_decoder", "add_cross_attention", "cross_attention_hidden_size", "finetuning_task",
    "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params", "pruned_heads",
    "bos_token_id", "eos_token_id",
})


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE scaling parameters as Hugging Face names them (`rope_parameters` minus the theta)."""

    rope_type: str
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    beta_fast: float | None = None  # yarn
    beta_slow: float | None = None  # yarn
    attention_factor: float | None = None  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool | None = None  # yarn

    def __post_init__(self):
        if self.rope_type not in SUPPORTED_ROPE_TYPES or self.rope_type == "default":
            raise ValueError(f"rope_parameters.rope_type={self.rope_type!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        required = {"linear": ("factor",), "yarn": ("factor", "original_max_position_embeddings"),
                    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
        for name in required[self.rope_type]:
            if getattr(self, name) is None:
                raise ValueError(f"rope_parameters.{name} is required for rope_type={self.rope_type!r}")

    def to_hf(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 1e6
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 40960
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Qwen3Config.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"Qwen3Config.num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"Qwen3Config.head_dim={self.head_dim} must be even for rotary embeddings")
        if not self.rope_theta > 0:
            raise ValueError(f"Qwen3Config.rope_theta must be > 0, got {self.rope_theta!r}")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    @property
    def num_params(self) -> int:
        e, h, k, d, m = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate_size
        per_layer = e * (h + 2 * k) * d + h * d * e + 3 * e * m + 2 * e + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * e
        return self.vocab_size * e + self.num_layers * per_layer + e + head

    def rope_frequencies(self) -> tuple[np.ndarray, float]:
        """(inverse frequencies [head_dim // 2] float32, cos/sin scale), as transformers computes them."""
        return rope_frequencies(self.rope_theta, self.head_dim, self.rope_scaling, self.max_position_embeddings)

    # --- Hugging Face config.json -------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "Qwen3Config":
        hf = dict(hf)
        model_type = hf.get("model_type", "qwen3")
        if model_type != "qwen3":
            raise ValueError(f"config field model_type={model_type!r} is not supported (expected 'qwen3')")
        _require_value(hf, "hidden_act", "silu")
        _require_value(hf, "attention_bias", False)
        _require_value(hf, "use_sliding_window", False)
        _require_value(hf, "partial_rotary_factor", 1.0)
        if hf.get("attention_dropout", 0.0) not in (0, 0.0):
            raise ValueError(f"config field attention_dropout={hf['attention_dropout']!r} is not supported (must be 0)")
        layer_types = hf.pop("layer_types", None)
        if layer_types is not None and any(t != "full_attention" for t in layer_types):
            raise ValueError(f"config field layer_types={layer_types!r} is not supported (only 'full_attention')")
        if hf.get("quantization_config") is not None:
            raise ValueError("config field quantization_config is not supported")
        for name in ("hidden_act", "attention_bias", "use_sliding_window", "partial_rotary_factor",
                     "attention_dropout", "sliding_window", "quantization_config"):
            hf.pop(name, None)

        theta, scaling = _parse_rope(hf.pop("rope_theta", None), hf.pop("rope_parameters", None),
                                     hf.pop("rope_scaling", None))
        try:
            num_heads = hf.pop("num_attention_heads")
            hidden = hf.pop("hidden_size")
            kwargs = dict(
                vocab_size=hf.pop("vocab_size"), hidden_size=hidden, num_layers=hf.pop("num_hidden_layers"),
                num_heads=num_heads, num_kv_heads=hf.pop("num_key_value_heads", None) or num_heads,
                head_dim=hf.pop("head_dim", None) or hidden // num_heads,
                intermediate_size=hf.pop("intermediate_size"), rope_theta=float(theta), rope_scaling=scaling,
                max_position_embeddings=hf.pop("max_position_embeddings", 40960),
                rms_norm_eps=float(hf.pop("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(hf.pop("tie_word_embeddings", False)),
                bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"))
        except KeyError as e:
            raise ValueError(f"config field {e.args[0]} is missing") from None
        unknown = sorted(k for k in hf if k not in _IGNORED_HF_KEYS)
        if unknown:
            raise ValueError(f"config field(s) {', '.join(unknown)} not supported by the Qwen3 port")
        return cls(**kwargs)

    @classmethod
    def from_hf_dir(cls, hf_dir: str | os.PathLike) -> "Qwen3Config":
        path = os.path.join(hf_dir, "config.json")
        with open(path) as f:
            return cls.from_hf_dict(json.load(f))

    def to_hf_dict(self, dtype: str = "bfloat16") -> dict[str, Any]:
        """transformers-5 style `config.json` (`rope_parameters` spelling)."""
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {**self.rope_scaling.to_hf(), "rope_theta": self.rope_theta}
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return {
            "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "dtype": dtype,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "intermediate_size": self.intermediate_size, "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope, "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False, "attention_dropout": 0.0, "use_sliding_window": False,
            "sliding_window": None, "bos_token_id": self.bos_token_id, "eos_token_id": eos, "use_cache": True,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_hf_dict(), indent=2, sort_keys=True)


def _require_value(hf: dict, name: str, expected):
    if name in hf and hf[name] is not None and hf[name] != expected:
        raise ValueError(f"config field {name}={hf[name]!r} is not supported (expected {expected!r})")


def _parse_rope(rope_theta, rope_parameters, rope_scaling) -> tuple[float, RopeScaling | None]:
    params = dict(rope_parameters or rope_scaling or {})
    if rope_parameters and rope_scaling:
        raise ValueError("config fields rope_parameters and rope_scaling are both set; keep one")
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError("config field rope_parameters: per-layer-type RoPE is not supported")
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    theta = params.pop("rope_theta", None)
    if theta is not None and rope_theta is not None and float(theta) != float(rope_theta):
        raise ValueError(f"config fields rope_theta={rope_theta} and rope_parameters.rope_theta={theta} disagree")
    theta = theta if theta is not None else rope_theta
    if theta is None:
        raise ValueError("config field rope_theta (or rope_parameters.rope_theta) is missing")
    if params.pop("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("config field rope_parameters.partial_rotary_factor is not supported (must be 1.0)")
    if rope_type == "default":
        if params:
            raise ValueError(f"config field(s) rope_parameters.{', '.join(sorted(params))} unexpected for default RoPE")
        return float(theta), None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"config field rope_parameters.rope_type={rope_type!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    known = {f.name for f in dataclasses.fields(RopeScaling)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"config field(s) rope_parameters.{', '.join(unknown)} not supported")
    return float(theta), RopeScaling(rope_type=rope_type, **params)


def rope_frequencies(theta: float, head_dim: int, scaling: RopeScaling | None,
                     max_position_embeddings: int) -> tuple[np.ndarray, float]:
    """Inverse RoPE frequencies and the cos/sin scale, following transformers' RoPE init functions."""
    dim = head_dim
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    # theta**e rounded to float32 before the reciprocal reproduces torch's float32 pow best, which
    # matters: float32 angles at position p amplify a 1-ulp frequency difference p times.
    pos_freqs = (np.float64(theta) ** exponents.astype(np.float64)).astype(np.float32)
    base_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
    if scaling is None:
        return base_freq, 1.0
    factor = scaling.factor
    if scaling.rope_type == "linear":
        return (base_freq / np.float32(factor)).astype(np.float32), 1.0
    if scaling.rope_type == "llama3":
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / base_freq
        freq = np.where(wavelen > low_wavelen, base_freq / factor, base_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * freq / factor + smooth * freq
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, freq).astype(np.float32), 1.0
    # yarn: blend interpolated and extrapolated frequencies over a linear ramp of dimensions.
    orig = scaling.original_max_position_embeddings
    factor = factor if factor is not None else max_position_embeddings / orig

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = scaling.attention_factor
    if attn is None:
        if scaling.mscale and scaling.mscale_all_dim:
            attn = mscale(factor, scaling.mscale) / mscale(factor, scaling.mscale_all_dim)
        else:
            attn = mscale(factor)
    beta_fast = scaling.beta_fast or 32
    beta_slow = scaling.beta_slow or 1

    def correction_dim(rotations):
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.truncate is None or scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_extra = 1.0 / pos_freqs
    inv_inter = 1.0 / (np.float32(factor) * pos_freqs)
    freq = inv_inter * (1 - extrapolation) + inv_extra * extrapolation
    return freq.astype(np.float32), float(attn)


# --- presets ------------------------------------------------------------------------------------
QWEN3_4B_INSTRUCT_2507 = Qwen3Config(
    vocab_size=151936, hidden_size=2560, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
    intermediate_size=9728, rope_theta=5e6, max_position_embeddings=262144, rms_norm_eps=1e-6,
    tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645)

QWEN3_4B = dataclasses.replace(QWEN3_4B_INSTRUCT_2507, rope_theta=1e6, max_position_embeddings=40960)

# A few-MB model for demos and smoke runs that still exercises GQA, QK-norm and the real vocab.
TINY = Qwen3Config(vocab_size=151936, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                   intermediate_size=128, rope_theta=5e6, max_position_embeddings=262144, tie_word_embeddings=True,
                   bos_token_id=151643, eos_token_id=151645)

PRESETS = {"qwen3-4b-instruct-2507": QWEN3_4B_INSTRUCT_2507, "qwen3-4b": QWEN3_4B, "tiny": TINY}


def preset(name: str) -> Qwen3Config:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
