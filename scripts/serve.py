"""Serve a checkpoint with JetStream's own gRPC server and orchestrator, on loopback only.

    python scripts/serve.py --checkpoint CKPT | --hf_dir D [--config=NAME] [--port 9000] [--slots 8]
    python scripts/serve_client.py --port 9000 --prompt "List the files in my home folder."

The server listens on 127.0.0.1 only (JetStream binds every interface by default; reach it from elsewhere through
an SSH tunnel). Sampling is server-wide (`--temperature 0` = greedy): JetStream requests carry no sampling settings.

Requests (JetStream's `Decode`, see serve_client.py):
- token requests: send the chat prompt's exact ids (`ChatEncoder.prompt_ids`, starting with `<|im_start|>`).
  JetStream always prepends its BOS, which for Qwen3 is `<|im_start|>`; the server drops that duplicate, so ids
  with or without the leading `<|im_start|>` give the same result. Replies stream back as token ids.
- text requests: the rendered chat text; the reply streams back as text and ids. JetStream decodes one token at
  a time, so multi-byte characters can come back broken: prefer token requests and decode on the client.
- prompts longer than `--max_prefill_length` are cut by JetStream to their last tokens (one of its power-of-two
  buckets); `max_tokens` counts generated tokens; stop tokens (`<|im_end|>`, `<|endoftext|>`) end the stream and
  are not sent. `session_cache` must stay empty (JetStream then skips its BOS handling and fails on token lists).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np

from t3rl_jax.model_loading import add_model_source_args, load_model_from_args, split_config_args
from t3rl_jax.rollout.engine import Qwen3Engine, SamplingSettings
from t3rl_jax.rollout.jetstream_api import QwenJetStreamTokenizer, engine_api, import_orchestrator, pack_result_tokens
from t3rl_jax.tokenizer import load_tokenizer

LOOPBACK = "127.0.0.1"
# JetStream's token_utils.pad_tokens only accepts these as max_prefill_length.
PREFILL_BUCKETS = tuple(2 ** k for k in range(4, 16))

log = logging.getLogger("serve")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ServingState:
    inner: object        # Qwen3Engine's DecodeState
    unsent: jax.Array    # [B] bool: the slot's last sampled token is a real token not yet streamed
    emitted: jax.Array   # [B] int32: tokens streamed for the slot's request so far


class ServingTokenizer(QwenJetStreamTokenizer):
    """Text requests get JetStream's BOS and prefill-bucket padding, like its own token path."""

    def encode(self, s: str, *, is_bos: bool = True, max_prefill_length: int | None = None,
               jax_padding: bool = True, **kwargs):
        from jetstream.engine import token_utils

        return token_utils.pad_tokens(np.asarray(self._tok.encode(s), np.int32), self.bos_id, self.pad_id,
                                      is_bos=is_bos, max_prefill_length=max_prefill_length, jax_padding=jax_padding)


class ServingEngine(engine_api.Engine):
    """Adapts `Qwen3Engine` to what JetStream 0.2.2's orchestrator expects of `generate`'s output.

    The orchestrator streams only tokens that `generate` returns, but our prefill samples the first token and keeps
    it in the prefix; and it compares the `length` column with the request's `max_tokens`, i.e. it wants the
    number of generated tokens, not the cache length. So each step here streams the token the slot *feeds* (its
    previous sample: the prefill token on the first step) and counts what it streamed. One extra step per request
    is the price.
    """

    def __init__(self, engine: Qwen3Engine):
        if engine.max_prefill_length not in PREFILL_BUCKETS:
            raise ValueError(f"max_prefill_length {engine.max_prefill_length} must be a power of two in "
                             f"[{PREFILL_BUCKETS[0]}, {PREFILL_BUCKETS[-1]}] (JetStream's prefill buckets)")
        self.inner = engine
        tok = engine.build_tokenizer()
        self._bos, self._pad = tok.bos_id, tok.pad_id
        self._stop_ids = jnp.asarray(sorted(tok.stop_tokens), jnp.int32)
        self._mark_inserted = jax.jit(self._mark_inserted_impl, donate_argnums=(1, 2))
        self._emit = jax.jit(self._emit_impl, donate_argnums=(1, 2))

    # -------------------------------------------------------------- the three calls that differ
    def prefill(self, *, params, existing_prefix=None, padded_tokens, true_length: int):
        tokens = np.asarray(padded_tokens, np.int32).reshape(-1)
        # JetStream cuts a too-long prompt to its last len(tokens) ids but reports the original length.
        true_length = min(int(true_length), len(tokens))
        if true_length >= 2 and tokens[0] == tokens[1] == self._bos:
            # JetStream's BOS in front of a prompt that already starts with <|im_start|>: never two in a row.
            tokens = np.append(tokens[1:], np.int32(self._pad))
            true_length -= 1
        return self.inner.prefill(params=params, existing_prefix=existing_prefix, padded_tokens=tokens,
                                  true_length=true_length)

    def _mark_inserted_impl(self, active, unsent, emitted, slot):
        return unsent.at[slot].set(active[slot]), emitted.at[slot].set(0)

    def insert(self, prefix, decode_state: ServingState, slot: int) -> ServingState:
        inner = self.inner.insert(prefix, decode_state.inner, slot)
        unsent, emitted = self._mark_inserted(inner.active, decode_state.unsent, decode_state.emitted,
                                              jnp.int32(slot))
        return ServingState(inner, unsent, emitted)

    def _emit_impl(self, fed, unsent, emitted, sampled, valid):
        emitted = emitted + unsent.astype(jnp.int32)
        return valid & ~jnp.isin(sampled, self._stop_ids), emitted, pack_result_tokens(fed, unsent, emitted)

    def generate(self, params, decode_state: ServingState):
        fed = jnp.copy(decode_state.inner.tokens)  # generate_steps donates the state it is given
        inner, tokens, _, valid, _ = self.inner.generate_steps(params, decode_state.inner, 1)
        unsent, emitted, result = self._emit(fed, decode_state.unsent, decode_state.emitted, tokens[0], valid[0])
        return ServingState(inner, unsent, emitted), result

    def init_decode_state(self, *args, **kwargs) -> ServingState:
        inner = self.inner.init_decode_state()
        b = self.inner.max_concurrent_decodes
        return ServingState(inner, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32))

    # -------------------------------------------------------------- the rest is the wrapped engine's
    def build_tokenizer(self, metadata=None):
        return ServingTokenizer(self.inner.build_tokenizer(metadata)._tok)

    def load_params(self, *args, **kwargs):
        return self.inner.load_params()

    def get_prefix_destination_sharding(self):
        return self.inner.get_prefix_destination_sharding()

    def get_tokenizer(self):
        return self.inner.get_tokenizer()

    @property
    def max_concurrent_decodes(self) -> int:
        return self.inner.max_concurrent_decodes

    @property
    def samples_per_slot(self) -> int:
        return 1

    @property
    def max_prefill_length(self) -> int:
        return self.inner.max_prefill_length

    @property
    def mesh(self):
        return self.inner.mesh

    @property
    def colocated_cpus(self):
        return None


def start_server(engine: Qwen3Engine, port: int, *, threads: int | None = None):
    """JetStream's `server_lib.run` with our engine on 127.0.0.1:port; returns its server (call `.stop()`)."""
    _, server_lib, config_lib = import_orchestrator()
    # server_lib binds f"{_HOST}:{port}" with _HOST = "[::]" (every interface); it has no host argument.
    server_lib._HOST = LOOPBACK
    serving = ServingEngine(engine)
    devices = list(engine.mesh.devices.flat)
    config = config_lib.ServerConfig(interleaved_slices=(f"device={len(devices)}",),
                                     interleaved_engine_create_fns=(lambda _devices: serving,))
    return server_lib.run(port=port, config=config, devices=devices, threads=threads)


def build_engine(model, *, slots: int, max_prefill_length: int, max_cache_length: int,
                 sampling: SamplingSettings, cache_dtype) -> Qwen3Engine:
    return Qwen3Engine(model, tokenizer=load_tokenizer(), max_concurrent_decodes=slots,
                       max_prefill_length=max_prefill_length, max_cache_length=max_cache_length,
                       sampling=sampling, cache_dtype=cache_dtype)


def parse_args(argv):
    run_config, argv = split_config_args(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source_args(p)
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--slots", type=int, default=8, help="concurrent requests (decode slots)")
    p.add_argument("--max_prefill_length", type=int, default=8192, choices=PREFILL_BUCKETS)
    p.add_argument("--max_cache_length", type=int, default=16384, help="prompt + reply tokens per request")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    return p.parse_args(argv), run_config


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args, run_config = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model, config = load_model_from_args(args, run_config)
    engine = build_engine(model, slots=args.slots, max_prefill_length=args.max_prefill_length,
                          max_cache_length=args.max_cache_length, cache_dtype=jnp.dtype(args.dtype),
                          sampling=SamplingSettings(args.temperature, args.top_p, args.top_k))
    server = start_server(engine, args.port)
    print(f"serving {args.checkpoint or args.hf_dir} ({config.num_params:,} parameters) on {LOOPBACK}:{args.port} "
          f"with {args.slots} slots; Ctrl-C or SIGTERM stops", flush=True)
    # SIGTERM takes the same clean path as Ctrl-C: the orchestrator's detokenize thread is not a daemon and
    # keeps the process alive unless the driver is stopped.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        server.wait_for_termination()  # stops the server (driver included) on the way out
    except KeyboardInterrupt:
        pass
    print("server stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
