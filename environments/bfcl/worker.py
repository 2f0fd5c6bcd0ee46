"""The episode table a pool worker (or an in-process pool) serves, and the worker process loop.

Requests are `(request_id, op, key, args)` tuples. Replies `(request_id, ok, value_or_error_text)` go back in
lists: requests already queued are served together and answered with one message, which saves a pipe round
trip and a wake-up of the parent's reader per request.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

from environments.bfcl import catalog, prompts
from environments.bfcl.episode import Episode, EpisodeResult


@dataclass(frozen=True)
class EpisodeStart:
    """Reply to open: the prompt style's first messages (its system prompt, if any, then turn 0's user messages)
    and its tool docs for the whole episode."""

    entry_id: str
    num_turns: int
    tools_json: str  # kept as JSON across the pipe: far cheaper to pickle than ~40 nested schemas
    first_messages: list[dict]

    @property
    def tools(self) -> list[dict]:
        return json.loads(self.tools_json)


@dataclass(frozen=True)
class TurnEnd:
    """Reply to end_turn: the next turn's user messages (None when the episode is over; at a miss_func reveal turn
    the style's reveal message, which already carries the revealed docs), the tools revealed at that turn in the
    style's doc form ([] on every other turn) and the turn verdicts so far."""

    next_messages: list[dict] | None
    revealed_tools: list[dict]
    turn_correct: tuple[bool, ...]


class EpisodeTable:
    """Live episodes by key, with the operations of the pool protocol."""

    def __init__(self):
        self.episodes: dict[int, Episode] = {}

    def handle(self, op: str, key: int, args: tuple) -> Any:
        if op == "open":
            if key in self.episodes:
                raise ValueError(f"episode key {key} is already open")
            entry_id, augment, reward_kind, prompt_style = args
            episode = Episode(entry_id, augment=augment, reward_kind=reward_kind, prompt_style=prompt_style)
            self.episodes[key] = episode
            return EpisodeStart(episode.entry_id, episode.num_turns, episode.tools_json, episode.first_messages)
        if op == "warmup":
            # Everything an episode needs once per process: the catalog, and every style's tool docs.
            prompts.preload()
            return len(catalog.all_entry_ids())
        episode = self.episodes.get(key)
        if episode is None:
            raise KeyError(f"no open episode with key {key}")
        if op == "step":
            return episode.step(args[0])
        if op == "text_reply":
            return episode.record_text_reply()
        if op == "format_error":
            return episode.record_format_error(args[0])
        if op == "end_turn":
            messages = episode.end_turn(cut_off=args[0])
            return TurnEnd(messages, episode.revealed_tools if messages else [], tuple(episode.turn_correct))
        if op == "finish":
            return self.finish(key)
        raise ValueError(f"unknown pool operation {op!r}")

    def finish(self, key: int) -> EpisodeResult:
        """Final result of an episode, releasing it."""
        return self.episodes.pop(key).result()


# Replies are sent at the latest after this long, so batching never holds back an answer noticeably.
_BATCH_SECONDS = 0.02
_BATCH_MAX = 64


# Tests only: every request but the start-up warm-up takes at least this long (seconds), so a pool with a shorter
# `step_timeout_s` times out for certain. A timeout alone is a race the test can lose: under load the worker may
# answer before the parent's monitor thread runs (seen in the suite with a 1 ms timeout).
DELAY_ENV = "T3RL_TEST_ENV_DELAY_S"
_DELAY_S = float(os.environ.get(DELAY_ENV) or 0)  # read once: workers are started with the run's environment


def _serve(table: EpisodeTable, message: tuple) -> tuple:
    request_id, op, key, args = message
    if _DELAY_S and op != "warmup":
        time.sleep(_DELAY_S)
    try:
        return (request_id, True, table.handle(op, key, args))
    except Exception as e:
        return (request_id, False, f"{type(e).__name__}: {e}")


def _send(conn, replies: list) -> bool:
    try:
        conn.send(replies)
    except (EOFError, OSError):
        return False
    except Exception:  # a reply that cannot be pickled must not kill the worker: send them one by one
        for request_id, ok, value in replies:
            try:
                conn.send([(request_id, ok, value)])
            except (EOFError, OSError):
                return False
            except Exception as e:
                conn.send([(request_id, False, f"reply could not be sent: {type(e).__name__}: {e}")])
    return True


def worker_main(conn) -> None:
    """Serve requests until told to stop or the parent goes away."""
    # Ctrl-C goes to the whole process group; the parent decides how workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    table = EpisodeTable()
    while True:
        replies = []
        started = time.monotonic()
        try:
            message = conn.recv()
            while True:
                if message[1] == "shutdown":
                    _send(conn, replies)
                    return
                replies.append(_serve(table, message))
                if len(replies) >= _BATCH_MAX or time.monotonic() - started > _BATCH_SECONDS or not conn.poll():
                    break
                message = conn.recv()
        except (EOFError, OSError):
            return
        if not _send(conn, replies):
            return
