"""Security and bad input on a real local cluster (Ray Serve, Redis, gRPC, SmolLM2): an API key on
HTTP and gRPC, the draft worker → verifier hop over TLS (certificates made here), request limits
(429 with Retry-After, 413), and a seeded fuzz of malformed requests — HTTP, the client gRPC API
and the verifier's own gRPC API — after which the cluster still serves correctly.

One cluster (1 draft worker, 1 verifier) serves the module; the malformed requests never reach the
model, so the fuzz stays cheap.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import math
import random
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import redis
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from specray.cluster.app.launcher import LocalCluster
from specray.cluster.runtime.config import ClusterConfig
from specray.protos.specray.v1 import generate_pb2 as gpb
from specray.protos.specray.v1 import generate_pb2_grpc, verify_pb2_grpc
from specray.protos.specray.v1 import verify_pb2 as vpb
from specray.workers.drafters.ngram import NgramDrafter
from specray.workers.engine.config import EngineConfig
from specray.workers.engine.llm_engine import LLMEngine
from specray.workers.engine.sampling import SamplingParams
from specray.workers.protocol import encode_params, encode_tensor

pytestmark = pytest.mark.slow
API_KEY = "sk-test-5f1c9e"
SERVER_NAME = "specray-verifier"  # the certificate's host name; verifiers advertise 127.0.0.1
PROMPT = "What is the capital of France?"
MAX_TOKENS = 12
MAX_BODY = 64 * 1024
FUZZ_HTTP = 600
FUZZ_GRPC = 600
FUZZ_VERIFIER = 200
AUTH = {"Authorization": f"Bearer {API_KEY}"}
METADATA = (("authorization", f"Bearer {API_KEY}"),)


def _write_certificates(directory: Path) -> dict[str, str]:
    """A throwaway CA and a verifier certificate it signed, for SERVER_NAME."""
    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject: str, key, issuer: str, issuer_key, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            names = [x509.DNSName(SERVER_NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = certificate("specray test CA", ca_key, "specray test CA", ca_key, ca=True)
    leaf = certificate(SERVER_NAME, leaf_key, "specray test CA", ca_key, ca=False)
    files = {
        "ca_file": directory / "ca.pem",
        "cert_file": directory / "verifier.pem",
        "key_file": directory / "verifier.key",
    }
    files["ca_file"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files["cert_file"].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    files["key_file"].write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return {name: str(path) for name, path in files.items()}


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> dict[str, str]:
    return _write_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def cluster(certificates, local_cluster_settings):
    config = ClusterConfig(
        **local_cluster_settings,
        api_key=API_KEY,
        limits={"max_concurrent_requests": 2, "retry_after_s": 3, "max_body_bytes": MAX_BODY},
        internal_tls={**certificates, "server_name": SERVER_NAME},
        draft_workers={"num_replicas": 1},
        verifiers={"num_replicas": 1, "kv_cache_tokens": 4096},
    )
    with LocalCluster(config) as running:
        yield running


@pytest.fixture(scope="module")
def engine(smollm2) -> LLMEngine:
    return LLMEngine(smollm2, NgramDrafter(), EngineConfig(num_speculative_tokens=5))


@pytest.fixture(scope="module")
def expected(engine) -> tuple[str, list[int]]:
    prompt = engine.encode_prompt(messages=[{"role": "user", "content": PROMPT}])
    [seq] = engine.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS))
    return engine.output_text(seq), seq.output_ids


def _send(cluster: LocalCluster, path: str, body: bytes, headers: dict, method: str = "POST"):
    request = urllib.request.Request(cluster.http_url + path, body, headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=300) as reply:
            return reply.status, reply.headers, reply.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def _chat(**extra) -> dict:
    return {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        **extra,
    }


def _post_json(
    cluster: LocalCluster, body: dict, headers: dict | None = None, path: str = "/v1/chat/completions"
):
    all_headers = {"Content-Type": "application/json", **(AUTH if headers is None else headers)}
    status, reply_headers, raw = _send(cluster, path, json.dumps(body).encode(), all_headers)
    return status, reply_headers, json.loads(raw)


def _is_openai_error(body: dict) -> bool:
    error = body.get("error")
    return (
        isinstance(error, dict)
        and isinstance(error.get("message"), str)
        and error["message"]
        and isinstance(error.get("type"), str)
        and {"param", "code"} <= error.keys()
    )


def _json_object(body: bytes | None) -> object:
    try:
        return json.loads(body) if body else None
    except ValueError:  # not JSON, or not UTF-8
        return None


def _grpc_channel(cluster: LocalCluster) -> grpc.Channel:
    return grpc.insecure_channel(cluster.grpc_address)


def _generate_request(**fields) -> gpb.GenerateRequest:
    defaults = {
        "messages": [gpb.ChatMessage(role="user", content=PROMPT)],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    return gpb.GenerateRequest(**{**defaults, **fields})


# ---- API key ------------------------------------------------------------------------------------
def test_api_key_on_http(cluster, expected):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        status, reply_headers, body = _post_json(cluster, _chat(), headers)
        assert status == 401 and reply_headers["WWW-Authenticate"] == "Bearer"
        assert _is_openai_error(body) and body["error"]["code"] == "invalid_api_key"
    status, _, raw = _send(cluster, "/v1/models", None, {}, method="GET")
    assert status == 401
    # Probes and scrapes stay open.
    assert _send(cluster, "/health", None, {}, method="GET")[0] == 200
    status, _, body = _post_json(cluster, _chat())
    assert status == 200 and body["choices"][0]["message"]["content"] == expected[0]


def test_api_key_on_grpc(cluster, expected):
    with _grpc_channel(cluster) as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(_generate_request(), metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:
                list(stub.GenerateStream(_generate_request(), metadata=metadata))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = stub.Generate(_generate_request(), metadata=METADATA)
        assert reply.text == expected[0] and list(reply.token_ids) == expected[1]


# ---- internal TLS -------------------------------------------------------------------------------
def _verifier_address(cluster: LocalCluster) -> str:
    with redis.Redis.from_url(cluster.config.redis_url, decode_responses=True) as client:
        return client.hget(next(client.scan_iter(match="specray:verifier:*")), "address")


def _tls_channel(address: str, certificates: dict[str, str]) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(Path(certificates["ca_file"]).read_bytes())
    return grpc.secure_channel(address, credentials, (("grpc.ssl_target_name_override", SERVER_NAME),))


def test_draft_to_verifier_grpc_is_tls(cluster, certificates):
    address = _verifier_address(cluster)
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            verify_pb2_grpc.VerifierStub(channel).Stats(vpb.StatsRequest(), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # a plaintext peer cannot talk to it
    with _tls_channel(address, certificates) as channel:
        stats = verify_pb2_grpc.VerifierStub(channel).Stats(vpb.StatsRequest(), timeout=30)
    assert stats.verifier_id.startswith("verifier-") and stats.steps > 0  # earlier tests went through TLS


# ---- limits -------------------------------------------------------------------------------------
def _open_stream(cluster: LocalCluster):
    body = json.dumps(_chat(max_tokens=400, stream=True)).encode()
    request = urllib.request.Request(
        cluster.http_url + "/v1/chat/completions", body, {"Content-Type": "application/json", **AUTH}
    )
    reply = urllib.request.urlopen(request, timeout=300)
    assert reply.readline().startswith(b"data: ")  # admitted and generating
    return reply


def test_too_many_concurrent_requests_get_429_with_retry_after(cluster, expected):
    held = [_open_stream(cluster) for _ in range(2)]  # the limit is 2
    try:
        status, headers, body = _post_json(cluster, _chat())
        assert status == 429 and headers["Retry-After"] == "3"
        assert _is_openai_error(body) and body["error"]["type"] == "rate_limit_error"
        with _grpc_channel(cluster) as channel:
            with pytest.raises(grpc.RpcError) as err:
                generate_pb2_grpc.GenerationStub(channel).Generate(_generate_request(), metadata=METADATA)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(err.value.trailing_metadata())["retry-after"] == "3"
    finally:
        for reply in held:
            reply.close()
    # The slots free as the router notices the clients left; then requests are served again.
    deadline = time.monotonic() + 120
    while (status := _post_json(cluster, _chat())[0]) == 429 and time.monotonic() < deadline:
        time.sleep(0.5)
    status, _, body = _post_json(cluster, _chat())
    assert status == 200 and body["choices"][0]["message"]["content"] == expected[0]


def test_huge_bodies_are_refused_unread(cluster):
    huge = json.dumps(_chat(user="x" * (2 * MAX_BODY))).encode()
    status, _, raw = _send(
        cluster, "/v1/chat/completions", huge, {"Content-Type": "application/json", **AUTH}
    )
    assert status == 413 and _is_openai_error(json.loads(raw))

    def chunks():  # no Content-Length: the limit applies as the bytes arrive
        for start in range(0, len(huge), 8192):
            yield huge[start : start + 8192]

    request = urllib.request.Request(
        cluster.http_url + "/v1/chat/completions",
        chunks(),
        {"Content-Type": "application/json", "Transfer-Encoding": "chunked", **AUTH},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=300)
    assert err.value.code == 413 and _is_openai_error(json.loads(err.value.read()))

    with _grpc_channel(cluster) as channel:
        with pytest.raises(grpc.RpcError) as err:
            generate_pb2_grpc.GenerationStub(channel).Generate(
                gpb.GenerateRequest(prompt="x" * (2 * MAX_BODY)), metadata=METADATA
            )
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# ---- fuzz ---------------------------------------------------------------------------------------
# Types are strict: JSON true is no integer, "4" no number, "yes" no boolean.
_WRONG_TYPES = {
    "max_tokens": ["ten", 1.5, [], {}, True, "4"],
    "temperature": ["hot", [], {}],
    "top_p": ["x", [0.5]],
    "top_k": ["k", 2.5],
    "seed": ["s", 1.5, []],
    "stop": [5, [1, 2], {"a": 1}],
    "stream": [[1], {}, "maybe", "yes", 1],
    "n": ["one", []],
    "session_id": [5, [], {}],
    "messages": ["hi", 5, {}, [5], [[]]],
}
_OUT_OF_RANGE = {
    "temperature": [-1, -0.001, 100.5, 1e300],
    "top_p": [0, -0.5, 1.0001, 7],
    "max_tokens": [0, -1, 10**9, 10**30],
    "max_completion_tokens": [0, -3],
    "n": [0, 17, 100],
    "seed": [-1, 2**64, 10**40],
    "top_k": [-2, 2**31, 10**20],
    "presence_penalty": [2.5, -3],
    "frequency_penalty": [2.01, -7],
    "repetition_penalty": [0, -1, 11],
    "logprobs": [21, -1],
}
_BAD_LITERALS = [b"NaN", b"Infinity", b"-Infinity"]


def _random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("abcdefghij klmnop") for _ in range(n))


def _http_fuzz_case(rng: random.Random) -> tuple[str, bytes, dict, str]:
    """(path, body, headers, method) of one request that must be refused with a 4xx."""
    path = rng.choice(["/v1/chat/completions", "/v1/completions"])
    headers = {"Content-Type": "application/json", **AUTH}
    base = _chat() if path.endswith("chat/completions") else {"prompt": PROMPT, "max_tokens": MAX_TOKENS}
    kind = rng.randrange(14)
    if kind == 0:  # not JSON at all
        return path, b"\x00" + rng.randbytes(rng.randrange(1, 200)), headers, "POST"
    if kind == 1:  # invalid UTF-8 inside a JSON string
        text = json.dumps(base).encode()
        cut = text.index(b'"', text.index(b":") + 1) + 1
        return (
            path,
            text[:cut] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88"]) + text[cut:],
            headers,
            "POST",
        )
    if kind == 2:  # JSON, but not an object
        return path, rng.choice([b"[]", b'"x"', b"1", b"null", b"true", b"[{}]"]), headers, "POST"
    if kind == 3:  # a field of the wrong type
        field = rng.choice(list(_WRONG_TYPES))
        if field == "messages" and not path.endswith("chat/completions"):
            field = "max_tokens"
        return path, json.dumps({**base, field: rng.choice(_WRONG_TYPES[field])}).encode(), headers, "POST"
    if kind == 4:  # a value out of range
        field = rng.choice(list(_OUT_OF_RANGE))
        return path, json.dumps({**base, field: rng.choice(_OUT_OF_RANGE[field])}).encode(), headers, "POST"
    if kind == 5:  # NaN / Infinity, which Python's JSON parser reads
        field = rng.choice(["temperature", "top_p", "presence_penalty"])
        text = json.dumps({**base, field: 12345.5}).encode().replace(b"12345.5", rng.choice(_BAD_LITERALS))
        return path, text, headers, "POST"
    if kind == 6:  # an unknown field
        field = "x_" + _random_text(rng, 6).replace(" ", "_")
        return path, json.dumps({**base, field: rng.choice([1, "a", None, [], {}])}).encode(), headers, "POST"
    if kind == 7:  # bad messages (or a missing prompt)
        if path.endswith("chat/completions"):
            messages = rng.choice(
                [
                    [],
                    [{}],
                    [{"role": "robot", "content": "hi"}],
                    [{"role": "user"}],
                    [{"role": "user", "content": 5}],
                    [{"role": "user", "content": "hi", "name": "x", "extra": 1}],
                ]
            )
            return path, json.dumps({**base, "messages": messages}).encode(), headers, "POST"
        body = {k: v for k, v in base.items() if k != "prompt"}
        return path, json.dumps(body).encode(), headers, "POST"
    if kind == 8:  # bad stop strings
        stop = rng.choice([[""], ["a"] * 17, ["y" * 300], ""])
        return path, json.dumps({**base, "stop": stop}).encode(), headers, "POST"
    if kind == 9:  # bad session ids
        session_id = rng.choice(["", "a b", "x" * 200, "é", "semi;colon", "new\nline"])
        return path, json.dumps({**base, "session_id": session_id}).encode(), headers, "POST"
    if kind == 10:  # an unpaired surrogate: valid JSON, not valid text
        text = json.dumps(base).replace(PROMPT, PROMPT[:5] + "\\ud800" + PROMPT[5:]).encode()
        return path, text, headers, "POST"
    if kind == 11:  # prompt longer than the model's context
        long = "hello " * 9000
        body = {**base, "max_tokens": 1}
        body["prompt" if "prompt" in base else "messages"] = (
            long if "prompt" in base else [{"role": "user", "content": long}]
        )
        return path, json.dumps(body).encode(), headers, "POST"
    if kind == 12:  # no key, a wrong key
        bad = rng.choice([{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic " + API_KEY}])
        return path, json.dumps(base).encode(), {"Content-Type": "application/json", **bad}, "POST"
    # wrong method or path, or too big a body
    return rng.choice(
        [
            ("/v1/chat/completions", None, AUTH, "GET"),
            ("/v1/nothing", json.dumps(base).encode(), headers, "POST"),
            (path, json.dumps({**base, "user": "u" * MAX_BODY}).encode(), headers, "POST"),
        ]
    )


def _grpc_fuzz_case(rng: random.Random) -> bytes:
    """A serialized GenerateRequest that must be refused with INVALID_ARGUMENT."""
    kind = rng.randrange(9)
    if kind == 0:  # bytes that cannot parse: a truncated field, a bad wire type, invalid UTF-8
        valid = _generate_request(seed=rng.randrange(2**32)).SerializeToString()
        tail = rng.choice([b"\x0a\xff\x01abc", b"\x0f", b"\x0a\x02\xff\xfe", b"\x12\x05\x0a\x01", b"\x80"])
        return valid + tail
    if kind == 1:
        return gpb.GenerateRequest(max_tokens=4).SerializeToString()  # no prompt, no messages
    if kind == 2:
        value = rng.choice([-1.0, -1e-3, 101.0, math.nan, math.inf])
        return _generate_request(temperature=value).SerializeToString()
    if kind == 3:
        value = rng.choice([0.0, -0.5, 1.5, math.nan, math.inf])
        return _generate_request(top_p=value).SerializeToString()
    if kind == 4:
        return _generate_request(top_k=rng.choice([2**31, 2**32 - 1])).SerializeToString()
    if kind == 5:
        role = rng.choice(["robot", "", "USER", "tool"])
        return gpb.GenerateRequest(messages=[gpb.ChatMessage(role=role, content="hi")]).SerializeToString()
    if kind == 6:
        stop = rng.choice([[""], ["a"] * 17, ["z" * 300]])
        return _generate_request(stop=stop).SerializeToString()
    if kind == 7:
        session_id = rng.choice(["a b", "x" * 200, "é", "tab\there"])
        return _generate_request(session_id=session_id).SerializeToString()
    return _generate_request(
        messages=[gpb.ChatMessage(role="user", content="hello " * 9000)],
        max_tokens=rng.choice([1, 2**32 - 1]),
    ).SerializeToString()


def _verifier_fuzz_messages(rng: random.Random, prompt: list[int], committed: int, vocab: int):
    """Malformed messages on a stream that carries session "fz" (committed tokens so far)."""
    tokens = [rng.randrange(vocab) for _ in range(rng.randrange(1, 4))]
    kind = rng.randrange(7)
    segment = {
        "session_id": "fz",
        "segment_id": rng.randrange(1, 10**6),
        "committed_len": committed,
        "tokens": tokens,
    }
    if kind == 0:
        segment["committed_len"] = committed + rng.choice([-1, 1, 10**6])
    elif kind == 1:
        segment["tokens"] = [*tokens, vocab + rng.randrange(10**6)]
    elif kind == 2:
        segment["tokens"] = [1] * (64 + rng.randrange(64))
    elif kind == 3:
        probs = torch.full((len(tokens), vocab), 1.0 / vocab)
        probs[0, rng.randrange(vocab)] = rng.choice([math.nan, math.inf, -0.5, 1.5, 0.9])
        segment["draft_probs"] = encode_tensor(probs)
    elif kind == 4:
        segment["confidence"] = [rng.choice([math.nan, -0.1, 1.1, math.inf])] * len(tokens)
    elif kind == 5:
        segment["session_id"] = rng.choice(["other", "", "fz2"])
    else:
        return vpb.DraftMessage(
            open=vpb.OpenSession(session_id="fz", token_ids=prompt, params=encode_params(SamplingParams()))
        )
    return vpb.DraftMessage(segment=vpb.DraftSegment(**segment))


def test_fuzz_malformed_requests_are_refused_and_the_cluster_still_serves(
    cluster, certificates, engine, expected
):
    rng = random.Random(20260627)
    statuses: dict[int, int] = {}
    for _ in range(FUZZ_HTTP):
        path, body, headers, method = _http_fuzz_case(rng)
        status, _, raw = _send(cluster, path, body, headers, method)
        assert 400 <= status < 500, (path, body[:200] if body else body, status, raw[:300])
        assert _is_openai_error(json.loads(raw)), raw[:300]
        if status == 400 and isinstance(_json_object(body), dict):
            # A JSON object that is refused has a field at fault, and the error names it.
            assert json.loads(raw)["error"]["param"], (body[:200], raw[:300])
        statuses[status] = statuses.get(status, 0) + 1

    codes: dict[str, int] = {}
    with _grpc_channel(cluster) as channel:
        methods = {
            "unary": channel.unary_unary("/specray.v1.Generation/Generate"),
            "stream": channel.unary_stream("/specray.v1.Generation/GenerateStream"),
        }
        for i in range(FUZZ_GRPC):
            data = _grpc_fuzz_case(rng)
            kind = "unary" if i % 2 else "stream"
            with pytest.raises(grpc.RpcError) as err:
                reply = methods[kind](data, metadata=METADATA, timeout=60)
                if kind == "stream":
                    list(reply)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (data[:100], err.value)
            codes[kind] = codes.get(kind, 0) + 1

    # The verifier's own API: one stream, a real session, then malformed messages between valid steps.
    prompt = engine.encode_prompt(messages=[{"role": "user", "content": PROMPT}])
    vocab = engine.target.config.vocab_size
    Code = vpb.VerifyError.Code
    open_session = vpb.DraftMessage(
        open=vpb.OpenSession(
            session_id="fz", token_ids=prompt, params=encode_params(SamplingParams(max_tokens=4))
        )
    )
    messages = [open_session]
    committed = len(prompt) + 1
    for _ in range(FUZZ_VERIFIER):
        messages.append(_verifier_fuzz_messages(rng, prompt, committed, vocab))
    messages.append(
        vpb.DraftMessage(segment=vpb.DraftSegment(session_id="fz", segment_id=10**7, committed_len=committed))
    )
    with _tls_channel(_verifier_address(cluster), certificates) as channel:
        replies = list(verify_pb2_grpc.VerifierStub(channel).Verify(iter(messages), timeout=300))
    assert len(replies) == len(messages)
    refused = replies[1:-1]
    assert all(r.WhichOneof("kind") == "error" for r in refused)
    assert {r.error.code for r in refused} <= {Code.INVALID, Code.STALE}
    # Nothing was committed by the malformed ones: the last valid step gives the engine's 2nd token.
    assert [replies[0].result.tokens[0], *replies[-1].result.tokens] == expected[1][:2]

    print(
        f"fuzz: HTTP {sum(statuses.values())} {statuses}, gRPC {sum(codes.values())} {codes}, verifier {len(refused)}"
    )
    assert sum(statuses.values()) + sum(codes.values()) >= 1000
    status, _, body = _post_json(cluster, _chat())
    assert status == 200 and body["choices"][0]["message"]["content"] == expected[0]
    with _grpc_channel(cluster) as channel:
        reply = generate_pb2_grpc.GenerationStub(channel).Generate(_generate_request(), metadata=METADATA)
    assert reply.text == expected[0]
