"""Run config -> Qwen3 architecture, placed parameters, and the two model graphs that share them.

The training graph uses the mesh: activation sharding constraints and, when the `sequence` axis is > 1,
context-parallel attention. The rollout graph is the same model with plain attention (decoding one token per slot
has nothing to split along the sequence). Both are `nnx.merge`d with the same parameter arrays, so an update by the
trainer is what the engine samples from next, with no copy.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from t3rl_jax import sharding as sh
from t3rl_jax.models import hf_io
from t3rl_jax.models.attention import attend
from t3rl_jax.models.attention_backends import get_attention
from t3rl_jax.models.embedding import make_sharded_embedding_lookup
from t3rl_jax.models.model_config import Qwen3Config, preset
from t3rl_jax.models.qwen3 import Qwen3, no_constraint

# Query/key tile of the blockwise training attention. On XLA:CPU 256 runs the demo's SFT step ~13% faster than 512
# (4,608-token rows, 4 heads of 16; BENCHMARKS.md, tenth session); accelerators keep 512, the size the
# H200/TPU fit checks were measured at (their context-parallel path uses this kernel).
TRAIN_ATTENTION_BLOCK = 512
CPU_TRAIN_ATTENTION_BLOCK = 256
ARCH_FIELDS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size")


def is_hf_dir(path: str) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "config.json"))


def model_config(cfg) -> Qwen3Config:
    """Architecture from `init_from`'s HF config when there is one, else from `model.preset`; the run config's
    architecture fields must agree with an HF checkpoint (a mismatch names the field) and override a preset."""
    m = cfg.model
    wanted = {f: m[f] for f in ARCH_FIELDS}
    if m.vocab_size is not None:
        wanted["vocab_size"] = m.vocab_size
    if is_hf_dir(cfg.init_from):
        base = Qwen3Config.from_hf_dir(cfg.init_from)
        for field, value in wanted.items():
            if getattr(base, field) != value:
                raise ValueError(f"config model.{field}={value} but {cfg.init_from}/config.json has "
                                 f"{getattr(base, field)}")
        return base
    return dataclasses.replace(preset(m.preset.replace("_", "-")), **wanted)


def _model_kwargs(cfg) -> dict[str, Any]:
    m = cfg.model
    return dict(param_dtype=jnp.dtype(m.param_dtype), compute_dtype=jnp.dtype(m.dtype), scan_layers=m.scan_layers,
                remat_policy=m.remat)


@dataclasses.dataclass
class ModelBundle:
    config: Qwen3Config
    mesh: jax.sharding.Mesh
    train_graph: Any           # (GraphDef, non-param state) of the training model
    rollout_graph: Any         # (GraphDef, non-param state) of the rollout model
    param_shardings: Any       # nnx.State of NamedShardings
    abstract_params: Any       # nnx.State of ShapeDtypeStructs carrying those shardings

    def train_model(self, params) -> Qwen3:
        graphdef, rest = self.train_graph
        return nnx.merge(graphdef, params, rest)

    def rollout_model(self, params) -> Qwen3:
        graphdef, rest = self.rollout_graph
        return nnx.merge(graphdef, params, rest)


def train_attention_block(mesh: jax.sharding.Mesh) -> int:
    return CPU_TRAIN_ATTENTION_BLOCK if mesh.devices.flat[0].platform == "cpu" else TRAIN_ATTENTION_BLOCK


def build(cfg, mesh: jax.sharding.Mesh, rules=sh.LOGICAL_AXIS_RULES) -> ModelBundle:
    """Abstract models and shardings; nothing is allocated."""
    mcfg = model_config(cfg)
    kwargs = _model_kwargs(cfg)
    # The platform's fused kernel (cuDNN, splash), or the blockwise one on CPU and under context parallelism:
    # exact, never builds the [heads, T, T] scores, and on XLA CPU several times faster than one batched einsum
    # (benchmarks/model_throughput.py).
    attention_fn = get_attention(cfg.model.get("attention", "auto"), mesh=mesh, rules=rules,
                                 block_size=train_attention_block(mesh), dtype=cfg.model.dtype)
    # The explicit lookup keeps XLA from replicating the looked-up activations (models/embedding.py).
    train = nnx.eval_shape(lambda: Qwen3(mcfg, rngs=nnx.Rngs(0), attention_fn=attention_fn,
                                         activation_constraint=sh.make_activation_constraint(mesh, rules),
                                         embedding_fn=make_sharded_embedding_lookup(mesh, rules), **kwargs))
    rollout = nnx.eval_shape(lambda: Qwen3(mcfg, rngs=nnx.Rngs(0), attention_fn=attend,
                                           activation_constraint=no_constraint, **kwargs))
    tg, tparams, trest = nnx.split(train, nnx.Param, ...)
    rg, _, rrest = nnx.split(rollout, nnx.Param, ...)
    shardings = sh.state_shardings(tparams, mesh, rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tparams, shardings)
    return ModelBundle(mcfg, mesh, (tg, trest), (rg, rrest), shardings, abstract)


def init_params(cfg, bundle: ModelBundle):
    """Parameters placed on the mesh: random (`init_from` empty), an HF directory, or another run's checkpoint."""
    source = cfg.init_from
    if not source:
        kwargs = _model_kwargs(cfg)

        def fresh():
            return nnx.state(Qwen3(bundle.config, rngs=nnx.Rngs(cfg.seed), **kwargs), nnx.Param)

        return jax.jit(fresh, out_shardings=bundle.param_shardings)()
    if is_hf_dir(source):
        by_path = nnx.to_pure_dict(bundle.param_shardings)

        def placement(path):
            node = by_path
            for key in path:
                node = node[key]
            return node

        model = hf_io.load_hf(source, config=bundle.config, shardings=placement, **_model_kwargs(cfg))
        return nnx.state(model, nnx.Param)
    if os.path.isdir(source):
        from t3rl_jax.checkpointing import restore_params_only

        pure = restore_params_only(source, nnx.to_pure_dict(bundle.abstract_params))
        params = jax.tree.map(lambda x: x, bundle.abstract_params)
        nnx.replace_by_pure_dict(params, pure)
        return params
    raise FileNotFoundError(f"init_from={source!r} is neither an HF directory (with config.json) nor a checkpoint "
                            "directory")
