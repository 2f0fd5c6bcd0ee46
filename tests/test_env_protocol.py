"""The environment protocol the core depends on: light to import, satisfied by the real pool, the only way in."""

from __future__ import annotations

import inspect
import pathlib
import re
import subprocess
import sys

import pytest

from configs import tiny
from environments.bfcl import catalog, prompts
from environments.bfcl.pool import EnvPool, RemoteEpisode as BfclRemoteEpisode
from t3rl_jax.envs import base

ROOT = pathlib.Path(__file__).resolve().parents[1]
WAIT = 60


def test_protocol_module_imports_neither_jax_nor_environments():
    code = ("import sys, t3rl_jax.envs.base; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'environments', "
            "'bfcl_eval')); print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _keyword_defaults(function) -> dict:
    params = inspect.signature(function).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def test_the_bfcl_pool_has_the_protocols_signatures():
    assert list(inspect.signature(EnvPool.open).parameters)[:2] == ["self", "entry_id"]
    theirs, ours = _keyword_defaults(base.EnvironmentPool.open), _keyword_defaults(EnvPool.open)
    assert set(theirs) <= set(ours) and ours["prompt_style"] == theirs["prompt_style"] == "t3rl"
    assert _keyword_defaults(BfclRemoteEpisode.end_turn) == _keyword_defaults(base.RemoteEpisode.end_turn)
    for name in ("step", "record_text_reply", "record_format_error", "end_turn", "finish"):
        assert list(inspect.signature(getattr(BfclRemoteEpisode, name)).parameters) == list(
            inspect.signature(getattr(base.RemoteEpisode, name)).parameters), name


@pytest.mark.parametrize("style", prompts.STYLES)
def test_a_whole_episode_through_the_factory_and_the_protocol(style):
    cfg = tiny.get_config()  # two worker processes, as the tiny preset runs
    with base.make_env_pool(cfg.env) as pool:
        assert isinstance(pool, base.EnvironmentPool)
        entry = catalog.load_entry("multi_turn_miss_func_0")
        episode = pool.open(entry.id, augment=cfg.env.augment, reward_kind=cfg.env.reward, prompt_style=style)
        assert isinstance(episode, base.RemoteEpisode)
        start = episode.started.result(WAIT)
        assert isinstance(start, base.EpisodeStart)
        assert start.first_messages == prompts.first_messages(entry, style)
        assert start.tools == prompts.tools(entry, style)
        for turn, calls in enumerate(entry.ground_truth):
            if calls:
                assert len(episode.step(list(calls)).result(WAIT)) == len(calls)
            else:
                assert episode.record_text_reply().result(WAIT) is None
            end = episode.end_turn().result(WAIT)
            assert isinstance(end, base.TurnEnd)
            if turn + 1 in entry.missed_function:
                assert end.next_messages == prompts.turn_messages(entry, turn + 1, style)
                assert end.revealed_tools == prompts.revealed_tools(entry, turn + 1, style) != []
            elif end.next_messages is not None:
                assert end.revealed_tools == []
        result = episode.finish().result(WAIT)
        assert isinstance(result, base.EpisodeResult)
        assert result.progress == 1.0 and not result.failed and result.failure_reason is None


def test_the_core_reaches_the_pool_only_through_the_factory():
    direct = re.compile(r"^\s*(from|import)\s+environments\.bfcl\.(pool|episode|worker)\b|"
                        r"^\s*from\s+environments\.bfcl\s+import\s+.*\b(EnvPool|Episode|RemoteEpisode)\b", re.M)
    offenders = {str(p.relative_to(ROOT)) for p in (ROOT / "t3rl_jax").rglob("*.py")
                 if direct.search(p.read_text(encoding="utf-8"))} - {"t3rl_jax/envs/base.py"}  # the factory
    assert not offenders, sorted(offenders)
