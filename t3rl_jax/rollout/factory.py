"""The run's rollout backend from its config: one `Qwen3Engine` (one slot class) or a `SlotClassBackend` over
`rollout.slot_classes`. The training loop, the fit check and the dry run build it here, so they agree."""

from __future__ import annotations

import jax.numpy as jnp

from t3rl_jax.rollout.engine import Qwen3Engine, SamplingSettings
from t3rl_jax.rollout.slot_classes import SlotClassBackend


def slot_classes_of(rollout_cfg) -> tuple[tuple[int, int], ...]:
    """(slots, cache length) per class: `rollout.slot_classes`, or max_concurrent_decodes x max_context_tokens."""
    classes = tuple((int(s), int(n)) for s, n in rollout_cfg.slot_classes)
    return classes or ((int(rollout_cfg.max_concurrent_decodes), int(rollout_cfg.max_context_tokens)),)


def make_backend(model, rollout_cfg, *, tokenizer=None, cache_dtype=jnp.float32, mesh=None, seed: int = 0):
    """`rollout_cfg`: the config's `rollout` section; the other arguments as `Qwen3Engine`'s."""
    r = rollout_cfg
    common = dict(tokenizer=tokenizer, sampling=SamplingSettings(temperature=r.temperature, top_p=r.top_p,
                                                                 top_k=r.top_k),
                  cache_dtype=cache_dtype, mesh=mesh, seed=seed)
    classes = slot_classes_of(r)
    if len(classes) == 1:
        (slots, length), = classes
        return Qwen3Engine(model, max_concurrent_decodes=slots, max_cache_length=length,
                           max_prefill_length=min(r.max_prefill_length, length), **common)
    return SlotClassBackend.build(model, classes, max_prefill_length=r.max_prefill_length, **common)


def backend_for_run(setup, params, *, mesh=None):
    """The backend `run.loop.make_engine` builds: the setup's rollout model over `params`, its tokenizer, mesh
    (`mesh`: another one, e.g. a host's local mesh), compute dtype for the cache and seed (`setup`: a
    `run.setup.RunSetup`)."""
    cfg = setup.cfg
    return make_backend(setup.bundle.rollout_model(params), cfg.rollout, tokenizer=setup.tokenizer,
                        cache_dtype=jnp.dtype(cfg.model.dtype), mesh=setup.mesh if mesh is None else mesh,
                        seed=cfg.seed)
