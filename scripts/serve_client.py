"""Example client of scripts/serve.py: send a chat prompt's token ids over gRPC and print the streamed tokens.

    python scripts/serve_client.py [--port 9000] --prompt "Create a folder named reports." [--max_tokens 128]
        [--system "..."]

Prints each streamed chunk of token ids as it arrives, then the decoded reply. Tokenisation and decoding stay on
the client (token requests), which keeps multi-byte characters intact.
"""

from __future__ import annotations

import argparse
import sys
import time

import grpc

from t3rl_jax.rollout.jetstream_api import engine_api  # noqa: F401  (JetStream's import fixes come first)
from jetstream.core.proto import jetstream_pb2, jetstream_pb2_grpc  # noqa: E402

from t3rl_jax.chat_format import ChatEncoder  # noqa: E402
from t3rl_jax.tokenizer import load_tokenizer  # noqa: E402


def wait_until_ready(address: str, timeout_s: float = 120.0) -> None:
    """Block until the server answers a health check (it compiles nothing before the first request)."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = jetstream_pb2_grpc.OrchestratorStub(channel)
        while True:
            try:
                if stub.HealthCheck(jetstream_pb2.HealthCheckRequest(), timeout=5).is_live:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no JetStream server answered at {address} within {timeout_s:.0f}s")
            time.sleep(0.5)


def stream_token_ids(address: str, token_ids, *, max_tokens: int, timeout_s: float = 300.0):
    """Yield the lists of token ids the server streams back for one token request."""
    request = jetstream_pb2.DecodeRequest(
        token_content=jetstream_pb2.DecodeRequest.TokenContent(token_ids=[int(t) for t in token_ids]),
        max_tokens=max_tokens)
    with grpc.insecure_channel(address) as channel:
        stub = jetstream_pb2_grpc.OrchestratorStub(channel)
        for response in stub.Decode(request, timeout=timeout_s):
            for sample in response.stream_content.samples:
                if sample.token_ids:
                    yield list(sample.token_ids)


def stream_text(address: str, text: str, *, max_tokens: int, timeout_s: float = 300.0):
    """Yield (text, token ids) chunks for one text request (the server tokenises and detokenises)."""
    request = jetstream_pb2.DecodeRequest(text_content=jetstream_pb2.DecodeRequest.TextContent(text=text),
                                          max_tokens=max_tokens)
    with grpc.insecure_channel(address) as channel:
        stub = jetstream_pb2_grpc.OrchestratorStub(channel)
        for response in stub.Decode(request, timeout=timeout_s):
            for sample in response.stream_content.samples:
                yield sample.text, list(sample.token_ids)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--system", help="an optional system message")
    p.add_argument("--max_tokens", type=int, default=128)
    args = p.parse_args(argv)
    address = f"{args.host}:{args.port}"
    chat = ChatEncoder(load_tokenizer())
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}]
    prompt_ids = chat.prompt_ids(messages)
    wait_until_ready(address)
    print(f"prompt: {len(prompt_ids)} tokens", flush=True)
    reply = []
    for chunk in stream_token_ids(address, prompt_ids, max_tokens=args.max_tokens):
        reply.extend(chunk)
        print(" ".join(map(str, chunk)), flush=True)
    print(f"--- {len(reply)} tokens:\n{chat.tokenizer.decode(reply)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
