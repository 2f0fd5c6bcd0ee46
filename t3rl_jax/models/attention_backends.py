"""Which attention kernel the training graph uses, chosen from the platform (`model.attention`).

Every backend returns a function with `attention.attend`'s signature
`fn(q, k, v, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids)`:

- `cudnn` (CUDA): cuDNN's fused flash attention (`__cudnn$fmha*` custom calls) in its packed layout, one
  causal sequence per segment (models/cudnn_attention.py).
- `splash` (TPU): Pallas splash attention with segment ids and a causal mask (Mosaic `tpu_custom_call`s;
  models/splash_attention.py).
- `blockwise` (CPU): the online-softmax tile kernel of models/chunked_attention.py, with context_parallel.py's
  all-gather or ring schedule over a `sequence` axis.
- `xla`: the reference `attention.attend` (materialises the scores; for tests and tiny models).

`cudnn` and `splash` mask by token index within each segment, which equals the position rule of `attend` for
packed rows (each segment contiguous, positions increasing along it: `rl/batching.py`). With a `sequence` mesh
axis > 1 (context parallelism), `cudnn` runs each device's queries against the all-gathered K/V with an explicit
mask (cuDNN's bias form, exact for the load-balanced order), and `splash` runs them against the all-gathered K/V
with a mask that is causal in the original order of the load-balanced chunks.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from t3rl_jax import sharding as sh

BACKENDS = ("auto", "cudnn", "splash", "blockwise", "xla")
_PLATFORM_ALIASES = {"gpu": "cuda", "cuda": "cuda", "tpu": "tpu", "cpu": "cpu"}
_AUTO = {"cuda": "cudnn", "tpu": "splash", "cpu": "blockwise"}
_NEEDS = {"cudnn": "cuda", "splash": "tpu"}


def normalize_platform(platform: str) -> str:
    try:
        return _PLATFORM_ALIASES[platform.lower()]
    except KeyError:
        raise ValueError(f"unknown platform {platform!r}; expected one of {sorted(_PLATFORM_ALIASES)}") from None


def platform_of(mesh) -> str:
    """The platform a mesh's devices compile for (compile-only H200/TPU devices included)."""
    return normalize_platform(mesh.devices.flat[0].platform)


def resolve_backend(backend: str = "auto", platform: str | None = None, *, cp: int = 1, dtype=None) -> str:
    """The concrete backend for `backend` on `platform` (default: jax's default backend) with context
    parallelism `cp` and activations of `dtype` (None: bfloat16). Raises a ValueError naming `model.attention`
    when the combination cannot work."""
    if backend not in BACKENDS:
        raise ValueError(f"model.attention={backend!r} unknown; expected one of {', '.join(BACKENDS)}")
    platform = normalize_platform(platform or jax.default_backend())
    half = dtype is None or jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    if backend == "auto":
        if platform == "cuda" and not half:  # cuDNN's flash kernels take 16-bit inputs only
            return "blockwise"
        return _AUTO[platform]
    if backend == "cudnn" and not half:
        raise ValueError(f"model.attention='cudnn' needs bfloat16 or float16 activations, got model.dtype={dtype}")
    if backend in _NEEDS and platform != _NEEDS[backend]:
        raise ValueError(f"model.attention={backend!r} needs a {_NEEDS[backend]} platform, but the mesh is on "
                         f"{platform}; use 'auto', 'blockwise' or 'xla'")
    return backend


def get_attention(backend: str = "auto", *, platform: str | None = None, mesh=None, rules=None,
                  block_size: int = 512, cp_strategy: str = "all_gather", max_segments: int | None = None,
                  interpret: bool = False, dtype=None) -> Callable:
    """An attention function for the training graph.

    platform: default the mesh's (else jax's default backend). mesh / rules: activations' layout (the fused
    kernels run per device under `shard_map`; a `sequence` axis > 1 means context parallelism). block_size:
    the blockwise kernel's tile. max_segments: segments per row the cuDNN packed layout reserves room for.
    interpret: run Pallas kernels in interpret mode (splash on CPU, for tests). dtype: the activations'
    (model.dtype), which `auto` takes into account.
    """
    rules = sh.LOGICAL_AXIS_RULES if rules is None else rules
    if platform is None and mesh is not None:
        platform = platform_of(mesh)
    cp = mesh.shape.get("sequence", 1) if mesh is not None else 1
    name = resolve_backend(backend, platform, cp=cp, dtype=dtype)
    if name == "xla":
        from t3rl_jax.models.attention import attend

        return attend
    if name == "blockwise":
        if cp > 1:
            from t3rl_jax.models.context_parallel import make_context_parallel_attention

            return make_context_parallel_attention(mesh, rules, strategy=cp_strategy, block_size=block_size)
        from t3rl_jax.models.chunked_attention import flash_attention

        return functools.partial(flash_attention, block_size=block_size)
    if name == "cudnn" and cp > 1:
        from t3rl_jax.models.context_parallel import make_context_parallel_attention

        return make_context_parallel_attention(mesh, rules, strategy=cp_strategy, local_kernel="cudnn")
    if name == "cudnn":
        from t3rl_jax.models import cudnn_attention

        kwargs = {} if max_segments is None else {"max_segments": max_segments}
        return per_device(functools.partial(cudnn_attention.attend, **kwargs), mesh, rules)
    from t3rl_jax.models import splash_attention

    if cp > 1:
        return splash_attention.make_context_parallel_attention(mesh, rules, interpret=interpret)
    return per_device(functools.partial(splash_attention.attend, interpret=interpret), mesh, rules)


def per_device(local: Callable, mesh, rules) -> Callable:
    """Run `local` (attend's signature) on each device's shard of the activations (batch / heads split; the
    sequence whole): custom-call kernels then see plain local arrays instead of relying on partitioning rules."""
    if mesh is None:
        return local
    q_spec = sh.logical_to_spec(("batch", "length", "heads", "head_dim"), rules, mesh=mesh)
    kv_spec = sh.logical_to_spec(("batch", "length", "kv_heads", "head_dim"), rules, mesh=mesh)
    tok_spec = jax.sharding.PartitionSpec(*q_spec[:2])

    def call(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
        return local(q, k, v, q_positions=q_pos, kv_positions=kv_pos, q_segment_ids=q_seg, kv_segment_ids=kv_seg)

    sharded = jax.shard_map(call, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec) + (tok_spec,) * 4,
                            out_specs=q_spec, check_vma=False)

    def attend(q, k, v, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids):
        sh.validate(mesh, seq_len=q.shape[1], num_heads=q.shape[2], num_kv_heads=k.shape[2],
                    batch_size=q.shape[0], rules=rules)
        return sharded(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids)

    return attend
