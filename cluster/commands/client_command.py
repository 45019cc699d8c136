"""`specray client`: send one prompt to a running `specray serve`, over HTTP (OpenAI) or gRPC.

The prompt goes as one user message of a chat completion, as `specray generate` sends it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc

from specray.protos.specray.v1 import generate_pb2 as pb
from specray.protos.specray.v1 import generate_pb2_grpc


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt")
    p.add_argument("--grpc", action="store_true", help="use the gRPC API instead of HTTP")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--session-id", help="keep a conversation on the verifier that holds its KV")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="HTTP address of the router")
    p.add_argument("--grpc-address", default="127.0.0.1:9000", help="gRPC address of the router")
    # Read from the environment at run time, not as the default: `--help` shows defaults.
    p.add_argument("--api-key", help="the server's key (default: $SPECRAY_API_KEY)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    pieces = _grpc(args) if args.grpc else _http(args)
    try:
        for text, final in pieces:
            sys.stdout.write(text)
            sys.stdout.flush()
            if final:
                print(f"\n\n[{final}]", file=sys.stderr)
    except (ClientError, grpc.RpcError) as err:
        message = err.details() if isinstance(err, grpc.RpcError) else str(err)
        print(f"specray client: error: {message}", file=sys.stderr)
        return 1
    sys.stdout.write("\n")
    return 0


class ClientError(RuntimeError):
    pass


def _summary(usage: dict, speculation: dict, finish_reason: str) -> str:
    return (
        f"{usage['completion_tokens']} tokens | finish {finish_reason} | "
        f"steps {speculation['verify_steps']} | τ {speculation['tau']:.2f}"
    )


def _auth(args: argparse.Namespace) -> dict[str, str]:
    key = args.api_key or os.environ.get("SPECRAY_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _http(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    body = {
        "messages": [{"role": "user", "content": args.prompt}],
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "stream": args.stream,
    }
    for key in ("seed", "session_id"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    request = urllib.request.Request(
        f"{args.url.rstrip('/')}/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json", **_auth(args)},
    )
    try:
        with urllib.request.urlopen(request, timeout=600) as reply:
            if not args.stream:
                data = json.load(reply)
                choice = data["choices"][0]
                yield (
                    choice["message"]["content"],
                    _summary(data["usage"], data["speculation"], choice["finish_reason"]),
                )
                return
            for line in reply:
                line = line.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[len("data: ") :])
                if "error" in data:
                    raise ClientError(data["error"]["message"])
                choice = data["choices"][0]
                final = choice["finish_reason"]
                yield (
                    choice["delta"].get("content", ""),
                    _summary(data["usage"], data["speculation"], final) if final else "",
                )
    except urllib.error.HTTPError as err:
        raise ClientError(json.loads(err.read() or b"{}").get("error", {}).get("message", str(err))) from err
    except urllib.error.URLError as err:
        raise ClientError(f"cannot reach {args.url}: {err.reason}") from err


def _grpc(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    request = pb.GenerateRequest(
        messages=[pb.ChatMessage(role="user", content=args.prompt)],
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        session_id=args.session_id or "",
    )
    with grpc.insecure_channel(args.grpc_address) as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)
        metadata = tuple((k.lower(), v) for k, v in _auth(args).items())
        replies = (
            stub.GenerateStream(request, metadata=metadata)
            if args.stream
            else [stub.Generate(request, metadata=metadata)]
        )
        for reply in replies:
            final = ""
            if reply.finish_reason:
                speculation = {"verify_steps": reply.stats.verify_steps, "tau": reply.stats.tau}
                usage = {"completion_tokens": reply.usage.completion_tokens}
                final = _summary(usage, speculation, reply.finish_reason)
            yield reply.text, final
