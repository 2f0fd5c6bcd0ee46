"""RolloutDriver: multi-turn BFCL episodes on a rollout backend and an environment pool, one call per batch.

The facade the trainer and the evaluation use. The episode rules (reply -> execute / feedback / end turn / stop,
limits, chat deltas) are `protocol.EpisodeProtocol`'s; slots, prefill batches, decode calls and metrics are
`scheduler.SlotScheduler`'s. Everything the model sees is kept as token ids: its sampled tokens (loss mask 1, with
log-probs) and the chat-template deltas of tool responses, feedback and new user turns (loss mask 0).
"""

from __future__ import annotations

import time
from typing import Any

from t3rl_jax.chat_format import ChatEncoder
from t3rl_jax.rollout.protocol import EpisodeProtocol, EpisodeRequest, RolloutLimits, open_remote
from t3rl_jax.rollout.scheduler import MAX_PREFILL_ROWS, RolloutMetrics, SlotScheduler, check_context_fits
from t3rl_jax.rollout.trajectory import Trajectory

__all__ = ["RolloutDriver", "RolloutLimits", "EpisodeRequest", "RolloutMetrics", "Trajectory", "MAX_PREFILL_ROWS"]


class RolloutDriver:
    def __init__(self, engine, pool, chat: ChatEncoder, *, limits: RolloutLimits = RolloutLimits(),
                 sampling=None, script=None):
        """`engine`: a rollout backend (`Qwen3Engine`); `pool`: an environment pool (`EnvPool`).
        `script(entry_id, turn, reply_in_turn) -> assistant message dict` teacher-forces every reply instead of
        sampling (ground-truth replay through the real engine, episode rules and scoring; log-probs are 0)."""
        check_context_fits(limits, engine)  # before any episode opens
        self.engine = engine
        self.pool = pool
        self.chat = chat
        self.limits = limits
        self.sampling = sampling or engine.sampling
        self.script = script
        self.metrics = RolloutMetrics()

    def run(self, requests: list[EpisodeRequest], params: Any = None, *, reset_metrics: bool = True
            ) -> list[Trajectory]:
        """Run all episodes to completion; trajectories come back in request order.

        `reset_metrics=False` adds to the metrics of earlier calls (several rollout rounds in one training step)."""
        params = self.engine.params if params is None else params
        if reset_metrics:
            self.metrics = RolloutMetrics()
        start = time.perf_counter()
        scheduler = SlotScheduler(self.engine, self.limits, self.sampling, self.metrics,
                                  stop_ids=self.chat.tokenizer.stop_ids)
        trajectories = scheduler.run(params, requests, self._start)
        self.metrics.wall_seconds += time.perf_counter() - start
        return trajectories

    def _start(self, request: EpisodeRequest) -> EpisodeProtocol:
        return EpisodeProtocol(request, open_remote(self.pool, request), self.chat, self.limits, script=self.script)
