"""What a run is built from, built once and allocating nothing: mesh, sharding rules, model bundle, tokenizer, chat
encoder, optimizer, step settings and every sharding. The training loop, the dry run and the fit check all start here.

Multi-host, `local_mesh` is this process's share of the mesh (rollouts decode there, `run/multihost.py`).
Problems with the mesh (its process count, its axis sizes against the devices, the micro-batch against the batch
axes) stop here as `ConfigError`s naming the keys, before anything is compiled or allocated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import NamedSharding

from t3rl_jax import model_factory
from t3rl_jax import sharding as sh
from t3rl_jax.chat_format import ChatEncoder
from t3rl_jax.config_checks import ConfigError
from t3rl_jax.rl.grpo import LossSettings
from t3rl_jax.rl.train_step import StepSettings, make_optimizer
from t3rl_jax.run import multihost
from t3rl_jax.tokenizer import load_tokenizer

__all__ = ["RunSetup", "build_setup", "check_mesh"]


@dataclasses.dataclass
class RunSetup:
    cfg: Any
    mesh: jax.sharding.Mesh
    local_mesh: jax.sharding.Mesh  # this process's devices, where its rollouts decode (the mesh on one process)
    rules: tuple
    bundle: model_factory.ModelBundle
    tokenizer: Any
    chat: ChatEncoder
    optimizer: Any
    step_settings: StepSettings
    batch_sharding: NamedSharding
    param_shardings: Any        # nnx.State of NamedShardings
    opt_shardings: Any
    abstract_opt: Any           # optimizer state of ShapeDtypeStructs carrying opt_shardings
    rows_per_micro: int
    cp: int

    @property
    def abstract_params(self):
        return self.bundle.abstract_params


def check_mesh(cfg, *, device_count: int | None = None) -> tuple[int, ...]:
    """The mesh axis sizes for the job's devices, or a ConfigError naming the mesh keys and the numbers."""
    try:
        sh.initialize_distributed(cfg.mesh)
    except ValueError as e:
        raise ConfigError(f"{e} (set mesh.num_processes / mesh.process_id / mesh.coordinator_address to match the "
                          "launched job)") from None
    devices = jax.device_count() if device_count is None else device_count
    try:
        shape = sh.mesh_shape(cfg.mesh, devices)
    except ValueError as e:
        raise ConfigError(f"mesh.data/fsdp/tensor/sequence: {e} ({jax.process_count()} process(es) with "
                          f"{jax.local_device_count()} local device(s) each)") from None
    sizes = dict(zip(sh.MESH_AXES, shape))
    shards = sizes["data"] * sizes["fsdp"]
    if cfg.train.micro_batch_size % shards:
        raise ConfigError(f"train.micro_batch_size: {cfg.train.micro_batch_size} is not divisible by the data x fsdp "
                          f"devices ({sizes['data']} x {sizes['fsdp']} = {shards})")
    return shape


def build_setup(cfg, *, devices=None) -> RunSetup:
    """`devices`: compile-only accelerator devices (t3rl_jax/accel) for the fit check; default jax.devices()."""
    check_mesh(cfg, device_count=None if devices is None else len(devices))
    mesh = sh.make_mesh(cfg.mesh, devices)
    try:
        local = multihost.local_mesh(mesh)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    # Weights shard over fsdp x sequence: context-parallel devices hold distinct weight shards instead of copies
    # (stage 2's 8 devices then split params and Adam state 8 ways, not 2).
    rules = sh.logical_axis_rules(fsdp_over_sequence=True)
    arch = model_factory.model_config(cfg)
    try:
        sh.validate(mesh, seq_len=cfg.train.max_seq_len, num_heads=arch.num_heads, num_kv_heads=arch.num_kv_heads,
                    rules=rules)
    except ValueError as e:
        raise ConfigError(f"mesh / train.max_seq_len / model heads: {e}") from None
    bundle = model_factory.build(cfg, mesh, rules)
    tokenizer = load_tokenizer(cfg.init_from if model_factory.is_hf_dir(cfg.init_from) else None)
    optimizer = make_optimizer(cfg.train)
    cp = mesh.shape["sequence"]
    batch_sharding = NamedSharding(mesh, sh.logical_to_spec(("batch", "length"), rules, mesh=mesh))
    step_settings = StepSettings(LossSettings.from_algo_config(cfg.algo),
                                 temperature=max(cfg.rollout.temperature, 1e-6),
                                 old_logprobs=cfg.algo.old_logprobs)
    abstract_opt = jax.eval_shape(optimizer.init, bundle.abstract_params)
    opt_shardings = sh.optax_state_shardings(abstract_opt, bundle.abstract_params, bundle.param_shardings, mesh)
    abstract_opt = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_opt, opt_shardings)
    return RunSetup(cfg=cfg, mesh=mesh, local_mesh=local, rules=rules, bundle=bundle, tokenizer=tokenizer, chat=ChatEncoder(tokenizer),
                    optimizer=optimizer, step_settings=step_settings, batch_sharding=batch_sharding,
                    param_shardings=bundle.param_shardings, opt_shardings=opt_shardings, abstract_opt=abstract_opt,
                    rows_per_micro=cfg.train.micro_batch_size, cp=cp)
