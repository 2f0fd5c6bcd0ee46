"""The rollout's counters (what the slot scheduler measures while it runs episodes) and their summary as metrics."""

from __future__ import annotations

import dataclasses

import numpy as np

from t3rl_jax.rollout.trajectory import Trajectory


@dataclasses.dataclass
class RolloutMetrics:
    episodes: int = 0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    decode_slot_steps: int = 0
    decode_active_slot_steps: int = 0
    env_requests: int = 0
    env_seconds: float = 0.0   # host time blocked on environment answers
    env_late_replies: int = 0
    env_failed: int = 0
    replies: int = 0
    replies_with_text: int = 0
    truncated_replies: int = 0
    wall_seconds: float = 0.0
    episode_seconds: list = dataclasses.field(default_factory=list)
    # Slot classes (`slot_classes.SlotClassBackend`): episodes moved to a larger class, and the ticks episodes spent
    # waiting for a free larger slot.
    migrations: int = 0
    migration_wait_ticks: int = 0
    class_slot_steps: dict = dataclasses.field(default_factory=dict)         # class cache length -> slot-steps
    class_active_slot_steps: dict = dataclasses.field(default_factory=dict)  # class cache length -> active ones

    def count_episode(self, traj: Trajectory, seconds: float) -> None:
        self.episodes += 1
        self.episode_seconds.append(seconds)
        self.env_failed += traj.termination == "env_failed"
        self.replies += traj.num_model_calls
        self.replies_with_text += traj.num_replies_with_text
        self.truncated_replies += traj.num_truncated_replies

    def count_decode(self, valid: np.ndarray, slot_classes) -> None:
        """One decode call's valid [steps, slots] mask; `slot_classes`: the backend's (slots, cache length) pairs,
        in slot order. Every slot of every class counts, whether its class ran or not: occupancy is the share of
        the reserved cache that generated."""
        self.decode_slot_steps += valid.size
        self.decode_active_slot_steps += int(valid.sum())
        start = 0
        for slots, length in slot_classes:
            part = valid[:, start:start + slots]
            self.class_slot_steps[length] = self.class_slot_steps.get(length, 0) + part.size
            self.class_active_slot_steps[length] = self.class_active_slot_steps.get(length, 0) + int(part.sum())
            start += slots

    def summary(self) -> dict[str, float]:
        def rate(n, s):
            return n / s if s > 0 else 0.0

        return {
            "rollout/episodes": self.episodes,
            "rollout/prefill_tokens_per_s": rate(self.prefill_tokens, self.prefill_seconds),
            "rollout/decode_tokens_per_s": rate(self.decode_tokens, self.decode_seconds),
            "rollout/slot_occupancy": rate(self.decode_active_slot_steps, self.decode_slot_steps),
            **{f"rollout/slot_occupancy_{length}": rate(self.class_active_slot_steps[length], steps)
               for length, steps in sorted(self.class_slot_steps.items())},
            "rollout/migrations": self.migrations,
            "rollout/migration_wait_ticks": self.migration_wait_ticks,
            "rollout/env_wait_ms": 1000 * rate(self.env_seconds, self.env_requests),
            "rollout/env_late_replies": self.env_late_replies,
            "rollout/env_failed": self.env_failed,
            "rollout/replies_with_surrounding_text": rate(self.replies_with_text, self.replies),
            "rollout/truncated_replies": self.truncated_replies,
            "rollout/episode_latency_s": float(np.mean(self.episode_seconds)) if self.episode_seconds else 0.0,
            "rollout/wall_s": self.wall_seconds,
        }
