"""JetStream serving of a checkpoint: a loopback gRPC round trip returns our engine's own greedy tokens."""

import importlib.util
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from t3rl_jax import params_checkpoint
from t3rl_jax.chat_format import ChatEncoder
from t3rl_jax.model_loading import load_model
from t3rl_jax.models.model_config import Qwen3Config
from t3rl_jax.models.qwen3 import Qwen3
from t3rl_jax.rollout.engine import Qwen3Engine, SamplingSettings
from t3rl_jax.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
MAX_TOKENS = 20
# 127.0.0.1 as /proc/net/tcp writes it, and as an IPv4-mapped address of a dual-stack socket (tcp6).
LOOPBACK_HEX = {"0100007F", "0000000000000000FFFF00000100007F"}
ENGINE = dict(max_prefill_length=64, max_cache_length=256)


def _script(name):
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", os.path.join(SCRIPTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


serve, client = _script("serve"), _script("serve_client")


@pytest.fixture(scope="module")
def chat():
    return ChatEncoder(load_tokenizer())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = Qwen3Config(vocab_size=151936, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      intermediate_size=64)
    path = tmp_path_factory.mktemp("serve") / "ck"
    params_checkpoint.save_params(path, Qwen3(cfg, rngs=nnx.Rngs(5)), config=cfg)
    return str(path)


def _engine_reply(model, prompt_ids, stop_ids) -> list[int]:
    """Greedy reply through the driver's path: extend_slot, then generate_steps until a stop or MAX_TOKENS."""
    engine = Qwen3Engine(model, max_concurrent_decodes=1, sampling=SamplingSettings(temperature=0.0), **ENGINE)
    state = engine.init_decode_state()
    state, token, _, _ = engine.extend_slot(None, state, 0, prompt_ids, reset=True)
    reply = [int(token)]
    while len(reply) < MAX_TOKENS + 1 and reply[-1] not in stop_ids:
        state, tokens, _, valid, _ = engine.generate_steps(engine.params, state, 8)
        reply += np.asarray(tokens)[np.asarray(valid)[:, 0], 0].tolist()
    for i, t in enumerate(reply):
        if t in stop_ids:
            return reply[:i]
    return reply[:MAX_TOKENS]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) of sockets listening on `port`."""
    found = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(name):
            continue
        with open(name) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.rsplit(":", 1)
                if state == "0A" and int(hex_port, 16) == port:
                    found.add(address)
    return found


def test_serving_engine_needs_a_jetstream_prefill_bucket(checkpoint):
    model, _ = load_model(checkpoint=checkpoint)
    engine = Qwen3Engine(model, tokenizer=load_tokenizer(), max_prefill_length=96, max_cache_length=256)
    with pytest.raises(ValueError, match="power of two"):
        serve.ServingEngine(engine)


@pytest.mark.slow
def test_loopback_round_trip_returns_the_engines_greedy_tokens(checkpoint, chat):
    prompt = chat.prompt_ids([{"role": "user", "content": "Move report.txt into the archive folder."}])
    assert prompt[0] == chat.tokenizer.im_start_id and len(prompt) < ENGINE["max_prefill_length"]
    model, _ = load_model(checkpoint=checkpoint)
    expected = _engine_reply(model, prompt, set(chat.tokenizer.stop_ids))
    assert len(expected) > 0

    port = _free_port()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.join(SCRIPTS, "serve.py"), "--checkpoint", checkpoint, "--port", str(port),
           "--slots", "2", "--max_prefill_length", str(ENGINE["max_prefill_length"]),
           "--max_cache_length", str(ENGINE["max_cache_length"])]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        address = f"127.0.0.1:{port}"
        client.wait_until_ready(address, timeout_s=180)
        listening = _listening_addresses(port)
        assert listening and listening <= LOOPBACK_HEX, listening  # not every interface
        with_bos = [t for chunk in client.stream_token_ids(address, prompt, max_tokens=MAX_TOKENS, timeout_s=180)
                    for t in chunk]
        assert with_bos == expected
        # Without the leading <|im_start|> (JetStream prepends it as BOS) and as text: the same reply.
        without = [t for chunk in client.stream_token_ids(address, prompt[1:], max_tokens=MAX_TOKENS, timeout_s=180)
                   for t in chunk]
        assert without == expected
        chunks = list(client.stream_text(address, chat.tokenizer.decode(prompt), max_tokens=5, timeout_s=180))
        assert [t for _, ids in chunks for t in ids] == expected[:5]
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            output, _ = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            output, _ = server.communicate()
    assert server.returncode == 0, output[-3000:]
    assert f"on 127.0.0.1:{port}" in output and "server stopped" in output
