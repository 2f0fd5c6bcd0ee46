"""The training step is deterministic on CPU: the same experience gives bit-identical batches, gradients, parameters
and metrics, on a mesh of 8 fake devices (FSDP, vocab-parallel loss, compact logits) and on 1 device.

Set up as the run loop does (tiny preset, KL on, trainer-side old log-probs): the config builds the mesh, model
bundle, optimizer and shardings; the experience comes from `experience.collect` over episodes whose reward depends
on their request only, and `batch_builder.build` packs it.
"""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from t3rl_jax import model_factory
from t3rl_jax import sharding as sh
from t3rl_jax.config import load_config
from t3rl_jax.rl import batch_builder, experience
from t3rl_jax.rl.grpo import LossSettings
from t3rl_jax.rl.learner import Learner
from t3rl_jax.rl.train_step import GRPOStep, StepSettings, make_optimizer
from t3rl_jax.rollout.trajectory import Trajectory


def _cfg(devices: int):
    return load_config("tiny", [f"mesh.fsdp={devices}", "mesh.data=1", "model.vocab_size=512", "seed=7",
                                "algo.kl_coef=0.1", "train.max_seq_len=256", "rollout.max_context_tokens=256",
                                "rollout.max_prefill_length=128", "rollout.max_response_tokens=128",
                                f"train.micro_batch_size={max(devices, 2)}", "data.prompts_per_step=2"])


def _rollout(requests):
    out = []
    for r in requests:
        rng = np.random.default_rng(r.seed)
        t = Trajectory(entry_id=r.entry_id, group_id=r.group_id, sample_index=r.sample_index, category=r.category)
        # The group shares its prompt, so the embedding gradient adds many times into the same rows.
        t.append_observation(np.random.default_rng(r.group_id).integers(0, 512, 40))
        t.append_sampled(rng.integers(0, 512, 20 + r.sample_index * 7), -rng.random(20 + r.sample_index * 7))
        t.append_observation([3, 4, 5] * 4)
        t.append_sampled(rng.integers(0, 512, 9), -rng.random(9))
        t.reward = float(rng.random())
        out.append(t)
    return out


def _prompts():
    while True:
        yield [{"metadata": {"bfcl_task": {"id": f"multi_turn_base_{i}"}}} for i in range(2)]


def _setup(cfg, devices):
    mesh = sh.make_mesh(cfg.mesh, devices=devices)
    rules = sh.logical_axis_rules(fsdp_over_sequence=True)
    bundle = model_factory.build(cfg, mesh, rules)
    optimizer = make_optimizer(cfg.train)
    abstract_opt = jax.eval_shape(optimizer.init, bundle.abstract_params)
    opt_shardings = sh.optax_state_shardings(abstract_opt, bundle.abstract_params, bundle.param_shardings, mesh)
    batch_sharding = NamedSharding(mesh, sh.logical_to_spec(("batch", "length"), rules, mesh=mesh))
    settings = StepSettings(LossSettings.from_algo_config(cfg.algo), temperature=cfg.rollout.temperature,
                            old_logprobs=cfg.algo.old_logprobs, compact_logits=True)
    params = model_factory.init_params(cfg, bundle)
    step = GRPOStep(bundle.train_model(params), optimizer, settings, param_shardings=bundle.param_shardings,
                    opt_shardings=opt_shardings, batch_sharding=batch_sharding, donate=False)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    return step, settings, params, opt_state


@pytest.mark.slow
@pytest.mark.parametrize("devices", [8, 1])
def test_same_experience_gives_bit_identical_updates(devices):
    cfg = _cfg(devices)
    built = []
    for _ in range(2):
        exp = experience.collect(cfg, 3, _prompts(), _rollout)
        built.append(batch_builder.build(exp.groups, cfg, rows_per_micro=cfg.train.micro_batch_size, cp=1)[0])
    for a, b in zip(built[0], built[1]):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    minis = built[0]
    assert len(minis) == 1 and minis[0]["tokens"].shape[0] >= 1

    step, settings, params, opt_state = _setup(cfg, jax.devices()[:devices])
    ref_params = jax.tree.map(lambda x: x + 1e-3, params)  # KL term non-zero
    learner = Learner(step, settings)
    results = [learner.update(params, opt_state, ref_params, minis) for _ in range(2)]
    (p0, o0, m0), (p1, o1, m1) = results
    assert m0 == m1 and m0["kl"] > 0 and m0["grad_norm"] > 0
    for a, b in zip(jax.tree.leaves((p0, o0)), jax.tree.leaves((p1, o1))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
