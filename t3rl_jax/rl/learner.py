"""One GRPO update from built mini-batches: old / reference log-prob passes, then one optimizer step per mini-batch.

The PPO anchor is the policy that generated the rollouts, so trainer-side old log-probs are computed before the
first update for every mini-batch but the first (it is updated at that policy: its own forward, without gradient,
is the anchor); the reference policy's log-probs (KL on) for every mini-batch. Each metric is combined over micro-
and mini-batches by its own reducer (`rl.step_metrics`): token-weighted means over the whole step, maxima and
minima as such, counts summed.
"""

from __future__ import annotations

from t3rl_jax.rl import step_metrics
from t3rl_jax.rl.train_step import GRPOStep, StepSettings


class Learner:
    def __init__(self, step_fn: GRPOStep, settings: StepSettings):
        self.step_fn = step_fn
        self.settings = settings

    def update(self, params, opt_state, ref_params, minis: list[dict]):
        """-> (params, opt_state, metrics: dict[str, float]) after len(minis) optimizer steps."""
        if not minis:
            raise ValueError("Learner.update needs at least one mini-batch")
        if self.settings.loss.needs_reference and ref_params is None:
            raise ValueError(f"algo.kl_coef={self.settings.loss.kl_coef} > 0 needs the reference parameters")
        step_fn = self.step_fn
        slots = step_fn.step_slots(minis)  # one compiled shape for the whole step
        olds = [None] * len(minis)
        if self.settings.old_logprobs == "trainer":
            # The first mini-batch is updated at the rollout policy itself, so its forward is its own anchor
            # (None: `update_weighted` takes it in-pass); later ones need the log-probs from before any update.
            olds = [None] + [step_fn.logprobs(params, mb, num_slots=slots) for mb in minis[1:]]
        refs = [step_fn.logprobs(ref_params, mb, num_slots=slots) if self.settings.loss.needs_reference else None
                for mb in minis]
        collected = []
        for mb, old, ref in zip(minis, olds, refs):
            params, opt_state, m = step_fn.update_weighted(params, opt_state, mb, old_logprobs=old,
                                                           ref_logprobs=ref, num_slots=slots)
            collected.append(m)
        merged = step_metrics.values(step_metrics.combine(collected))
        merged["num_optimizer_steps"] = float(len(minis))
        return params, opt_state, merged
