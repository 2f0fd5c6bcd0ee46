"""How one GRPO update moves the policy on one step's real rollouts, at several learning rates.

    python scripts/grpo_update_probe.py --config=demo [--config.KEY=VALUE ...] [--lrs 1e-4,3e-4,1e-3] [--first 10]

Rolls out step 0's prompts through the run's own path (env pool, engine, episode protocol), builds its mini-batches,
then for each learning rate applies `Learner.update` (fresh Adam moments, as at GRPO step 0) to the same batch and
recomputes every episode's sampled-token log-probs. Per learning rate it prints the mean change of log-prob per
sampled token for the episodes with positive and with negative advantage and over each episode's first `--first`
sampled tokens (the opening of the first reply, which nearly every episode shares), the surrogate
sum_i A_i * mean change_i, and the correlation of the change with the advantage. A step that helps raises the
positive episodes; the demo's tuning (BENCHMARKS.md, "CPU demo") used it to tell a step too small to move the
samples from one that breaks what every episode shares.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def episode_changes(before, after, batch: dict, *, first: int) -> np.ndarray:
    """Rows of (advantage, mean change over the episode's sampled tokens, mean change over its first `first`
    sampled tokens, sampled tokens), one per packed episode. `before` / `after`: token log-probs shaped like
    batch["loss_mask"] ([micro, rows, length]); a segment is one episode (`rl/batching.py`)."""
    out = []
    seg, mask, adv = batch["segment_ids"], batch["loss_mask"] > 0, batch["advantages"]
    delta = np.asarray(after, np.float64) - np.asarray(before, np.float64)
    for idx in np.ndindex(seg.shape[:2]):
        for s in np.unique(seg[idx]):
            sampled = (seg[idx] == s) & mask[idx]
            if s == 0 or not sampled.any():
                continue
            d = delta[idx][sampled]
            out.append((float(adv[idx][sampled][0]), d.mean(), d[:first].mean(), int(sampled.sum())))
    return np.asarray(out, np.float64).reshape(-1, 4)


def summary(rows: np.ndarray) -> dict:
    adv, change, opening = rows[:, 0], rows[:, 1], rows[:, 2]
    mean = lambda x: float(x.mean()) if x.size else float("nan")  # noqa: E731
    corr = float(np.corrcoef(adv, change)[0, 1]) if len(adv) > 1 and adv.std() and change.std() else float("nan")
    return {"positive": mean(change[adv > 0]), "negative": mean(change[adv < 0]), "opening": mean(opening),
            "surrogate": float((adv * change).sum()), "corr": corr}


def main(argv=None) -> int:
    from t3rl_jax.config import config_from_argv

    cfg, rest = config_from_argv(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lrs", default="1e-4,3e-4,1e-3", help="comma-separated learning rates")
    parser.add_argument("--first", type=int, default=10, help="opening tokens of each episode")
    args = parser.parse_args(rest)

    import jax
    import ml_collections

    from t3rl_jax import model_factory
    from t3rl_jax.rl import batch_builder, experience
    from t3rl_jax.rl.learner import Learner
    from t3rl_jax.rl.train_step import GRPOStep, make_optimizer
    from t3rl_jax.rollout.driver import RolloutDriver
    from t3rl_jax.run import hooks, loop
    from t3rl_jax.run.setup import build_setup

    setup = build_setup(cfg)
    prompts = loop.prompt_iterator(cfg, setup.chat)
    with loop.open_env_pool(cfg) as pool:
        params = model_factory.init_params(cfg, setup.bundle)
        driver = RolloutDriver(loop.make_engine(setup, params), pool, setup.chat,
                               limits=hooks.rollout_limits(cfg, cfg.rollout.max_steps_per_turn))
        exp = experience.collect(cfg, 0, prompts, driver.run)
    rewards = [t.reward for g in exp.groups for t in g]
    print(f"step 0: {len(rewards)} episodes in {len(exp.groups)} groups, mean reward {np.mean(rewards):.3f}")
    minis, _ = batch_builder.build(exp.groups, cfg, rows_per_micro=setup.rows_per_micro, cp=setup.cp)
    if minis is None:
        print("no group to train on")
        return 1
    print(f"{'lr':>8} {'positive':>9} {'negative':>9} {'opening':>9} {'surrogate':>9} {'corr':>6}  (mean change of "
          f"log-prob per sampled token; opening: each episode's first {args.first}; corr: with the advantage)")
    for lr in (float(x) for x in args.lrs.split(",")):
        train_cfg = ml_collections.ConfigDict(cfg.train.to_dict())
        train_cfg.lr = lr
        optimizer = make_optimizer(train_cfg)
        step_fn = GRPOStep(setup.bundle.train_model(params), optimizer, setup.step_settings,
                           param_shardings=setup.param_shardings, opt_shardings=setup.opt_shardings,
                           batch_sharding=setup.batch_sharding, donate=False)  # params are reused per lr
        slots = step_fn.step_slots(minis)

        def logprobs(p):
            return [np.stack([np.asarray(x) for x in step_fn.logprobs(p, mb, num_slots=slots)]) for mb in minis]

        before = logprobs(params)
        opt_state = jax.jit(optimizer.init, out_shardings=setup.opt_shardings)(params)
        updated, _, _ = Learner(step_fn, setup.step_settings).update(params, opt_state, None, minis)
        rows = np.concatenate([episode_changes(b, a, mb, first=args.first)
                               for b, a, mb in zip(before, logprobs(updated), minis)])
        s = summary(rows)
        print(f"{lr:>8.0e} {s['positive']:>+9.4f} {s['negative']:>+9.4f} {s['opening']:>+9.4f} {s['surrogate']:>+9.3f} "
              f"{s['corr']:>6.2f}")
    return 0


if __name__ == "__main__":  # the env pool's workers start by forkserver: they import this module, not run it
    sys.exit(main())
