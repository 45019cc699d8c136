"""End to end on a real local cluster: Ray Serve (2 draft workers, 2 verifiers), Redis, gRPC, SmolLM2.

One cluster serves the whole module; requests stay short (greedy, few tokens) for a 2-core CI box.
The last section is what OpenAI clients send and expect, through the official `openai` client, raw
HTTP and gRPC: request shapes, n, penalties, logprobs (equal to the engine's), the model check.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import openai
import pytest
from cluster_testing import engine_greedy
from prometheus_client.parser import text_string_to_metric_families

from specray.cluster.app.launcher import LocalCluster
from specray.cluster.commands import cli
from specray.cluster.runtime.config import ClusterConfig
from specray.protos.specray.v1 import generate_pb2, generate_pb2_grpc, verify_pb2, verify_pb2_grpc
from specray.workers.drafters.ngram import NgramDrafter
from specray.workers.engine.config import EngineConfig
from specray.workers.engine.llm_engine import LLMEngine
from specray.workers.engine.sampling import SamplingParams
from specray.workers.protocol import encode_params

pytestmark = pytest.mark.slow
PROMPTS = [
    "What is the capital of France?",
    "List three colors.",
    "Write a haiku about the sea.",
    "Count from one to five in words.",
    "Name two planets.",
    "Say hello in Spanish.",
    "What is 2 + 2?",
    "Give one synonym for happy.",
]
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def cluster(local_cluster_settings):
    config = ClusterConfig(
        **local_cluster_settings,
        finished_ttl_s=120,
        draft_workers={"num_replicas": 2},
        verifiers={"num_replicas": 2, "kv_cache_tokens": 4096},
    )
    with LocalCluster(config) as running:
        yield running


@pytest.fixture(scope="module")
def expected(smollm2):
    """`specray generate`'s greedy text and token ids for each prompt (single-process engine)."""
    return engine_greedy(smollm2, PROMPTS, MAX_TOKENS)


def _post(cluster: LocalCluster, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        cluster.http_url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _chat(prompt: str, **extra) -> dict:
    return {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        **extra,
    }


def _sse(cluster: LocalCluster, path: str, body: dict) -> list[dict]:
    request = urllib.request.Request(
        cluster.http_url + path,
        json.dumps({**body, "stream": True}).encode(),
        {"Content-Type": "application/json"},
    )
    events = []
    with urllib.request.urlopen(request, timeout=300) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        for line in reply:
            line = line.decode().strip()
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def _grpc_stub(cluster: LocalCluster) -> tuple[grpc.Channel, generate_pb2_grpc.GenerationStub]:
    channel = grpc.insecure_channel(cluster.grpc_address)
    return channel, generate_pb2_grpc.GenerationStub(channel)


def test_http_greedy_equals_engine(cluster, expected):
    status, body = _post(cluster, "/v1/chat/completions", _chat(PROMPTS[0]))
    assert status == 200
    assert body["choices"][0]["message"]["content"] == expected[0][0]
    assert body["usage"]["completion_tokens"] == len(expected[0][1])
    assert body["speculation"]["verify_steps"] >= 1

    events = _sse(cluster, "/v1/chat/completions", _chat(PROMPTS[1]))
    assert "".join(e["choices"][0]["delta"]["content"] for e in events) == expected[1][0]
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_grpc_greedy_equals_engine(cluster, expected):
    channel, stub = _grpc_stub(cluster)
    with channel:
        request = generate_pb2.GenerateRequest(
            messages=[generate_pb2.ChatMessage(role="user", content=PROMPTS[2])],
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
        reply = stub.Generate(request)
        assert reply.text == expected[2][0] and list(reply.token_ids) == expected[2][1]
        streamed = list(stub.GenerateStream(request))
        assert "".join(r.text for r in streamed) == expected[2][0]
        assert [t for r in streamed for t in r.token_ids] == expected[2][1]
        assert streamed[-1].finish_reason and streamed[-1].usage.completion_tokens == len(expected[2][1])


def test_models_and_health(cluster):
    with urllib.request.urlopen(cluster.http_url + "/v1/models") as reply:
        assert json.load(reply)["data"][0]["id"] == cluster.config.model
    with urllib.request.urlopen(cluster.http_url + "/health") as reply:
        assert json.load(reply) == {"status": "ok", "verifiers": 2, "draft_workers": 2}


def test_eight_concurrent_sessions_over_two_pools(cluster, store, expected):
    session_ids = [f"conc-{i}" for i in range(len(PROMPTS))]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        replies = list(
            pool.map(
                lambda i: _post(
                    cluster, "/v1/chat/completions", _chat(PROMPTS[i], session_id=session_ids[i])
                ),
                range(len(PROMPTS)),
            )
        )
    for (status, body), (text, _) in zip(replies, expected):
        assert status == 200
        assert body["choices"][0]["message"]["content"] == text
    records = [store.hgetall(f"specray:session:{sid}") for sid in session_ids]
    assert all(r["status"] == "finished" for r in records)
    assert len({r["verifier"] for r in records}) == 2  # both verifiers served
    assert len({r["draft_worker"] for r in records}) == 2  # both draft workers drafted
    for sid, record, (_, ids) in zip(session_ids, records, expected):
        assert json.loads(record["output_ids"]) == ids
        assert 0 < store.ttl(f"specray:session:{sid}") <= cluster.config.finished_ttl_s

    # Affinity: the same session id goes back to the verifier that served it.
    _post(cluster, "/v1/chat/completions", _chat(PROMPTS[0], session_id=session_ids[0], max_tokens=2))
    assert store.hget(f"specray:session:{session_ids[0]}", "verifier") == records[0]["verifier"]


def _verifier_stats(store) -> list[verify_pb2.StatsReply]:
    stats = []
    for key in store.scan_iter(match="specray:verifier:*"):
        with grpc.insecure_channel(store.hget(key, "address")) as channel:
            stats.append(verify_pb2_grpc.VerifierStub(channel).Stats(verify_pb2.StatsRequest()))
    return stats


def test_client_disconnect_frees_session(cluster, store):
    body = _chat(PROMPTS[3], max_tokens=400, session_id="gone", stream=True)
    request = urllib.request.Request(
        cluster.http_url + "/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    reply = urllib.request.urlopen(request, timeout=300)
    assert reply.readline().startswith(b"data: ")
    record = store.hgetall("specray:session:gone")
    assert record["status"] == "running" and record["verifier"] and record["draft_worker"]
    reply.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stats = _verifier_stats(store)
        # KV is freed between verifier steps, a moment after the session is forgotten: wait for both.
        freed = all(s.active_sessions == 0 and s.kv_blocks_used == 0 for s in stats)
        if freed and not store.exists("specray:session:gone"):
            break
        time.sleep(0.5)
    assert not store.exists("specray:session:gone")
    assert all(s.active_sessions == 0 and s.kv_blocks_used == 0 for s in stats)


def test_stale_segment_over_grpc_is_rejected_and_session_continues(cluster, store, smollm2, expected):
    address = store.hget(next(store.scan_iter(match="specray:verifier:*")), "address")
    prompt = LLMEngine(smollm2).encode_prompt(messages=[{"role": "user", "content": PROMPTS[0]}])
    opened = verify_pb2.DraftMessage(
        open=verify_pb2.OpenSession(
            session_id="raw", token_ids=prompt, params=encode_params(SamplingParams(max_tokens=MAX_TOKENS))
        )
    )
    committed = len(prompt) + 1

    def segment(segment_id: int, committed_len: int, tokens: list[int]) -> verify_pb2.DraftMessage:
        return verify_pb2.DraftMessage(
            segment=verify_pb2.DraftSegment(
                session_id="raw", segment_id=segment_id, committed_len=committed_len, tokens=tokens
            )
        )

    messages = [
        opened,
        segment(1, committed - 1, []),
        segment(2, committed, [10**7]),
        verify_pb2.DraftMessage(segment=verify_pb2.DraftSegment(session_id="other", committed_len=committed)),
        segment(3, committed, []),
        verify_pb2.DraftMessage(close=verify_pb2.CloseSession(session_id="raw")),
    ]
    with grpc.insecure_channel(address) as channel:
        replies = list(verify_pb2_grpc.VerifierStub(channel).Verify(iter(messages)))
    Code = verify_pb2.VerifyError.Code
    assert replies[1].error.code == Code.STALE and replies[1].error.committed_len == committed
    assert replies[2].error.code == Code.INVALID  # token id out of the vocabulary
    assert replies[3].error.code == Code.INVALID  # another session's segment on this stream
    assert [replies[0].result.tokens[0], *replies[4].result.tokens] == expected[0][1][:2]


def _metrics(cluster: LocalCluster) -> dict[tuple[str, frozenset], float]:
    """The router's /metrics as {(sample name, labels): value}; parsing it checks the text format."""
    with urllib.request.urlopen(cluster.http_url + "/metrics") as reply:
        assert reply.headers["content-type"].startswith("text/plain")
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_follow_the_requests(cluster):
    before = _metrics(cluster)
    replies = [_post(cluster, "/v1/chat/completions", _chat(p)) for p in PROMPTS[3:5]]
    events = _sse(cluster, "/v1/chat/completions", _chat(PROMPTS[5]))
    after = _metrics(cluster)

    def moved(name: str, **labels: str) -> float:
        key = (name, frozenset({"model_name": cluster.config.model, **labels}.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert all(status == 200 for status, _ in replies)
    speculation = [body["speculation"] for _, body in replies]
    drafted = moved("specray:spec_decode_num_draft_tokens_total")
    accepted = moved("specray:spec_decode_num_accepted_tokens_total")
    # The streamed reply carries no speculation stats, so the two whole replies bound it from below.
    assert drafted >= sum(s["draft_tokens"] for s in speculation)
    assert accepted >= sum(s["accepted_tokens"] for s in speculation)
    assert 0 <= accepted <= drafted
    assert moved("specray:spec_decode_num_drafts_total") <= drafted
    per_pos = sum(
        after[key] - before.get(key, 0.0)
        for key in after
        if key[0] == "specray:spec_decode_num_accepted_tokens_per_pos_total"
    )
    assert per_pos == accepted
    assert moved("specray:time_to_first_token_seconds_count") == 3
    assert moved("specray:inter_token_latency_seconds_count") > 0
    reasons = [body["choices"][0]["finish_reason"] for _, body in replies]
    reasons.append(events[-1]["choices"][0]["finish_reason"])
    for reason in set(reasons):
        assert moved("specray:request_success_total", finish_reason=reason) == reasons.count(reason)
    assert moved("specray:num_requests_running") == 0 and moved("specray:num_requests_waiting") == 0
    # vLLM's request counters: prompt and output tokens, end-to-end latency of the three requests.
    usage = [body["usage"] for _, body in replies]
    assert moved("specray:prompt_tokens_total") >= sum(u["prompt_tokens"] for u in usage)
    assert moved("specray:generation_tokens_total") >= sum(u["completion_tokens"] for u in usage)
    assert moved("specray:e2e_request_latency_seconds_count") == 3
    assert moved("specray:request_failure_total", reason="unavailable") == 0


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user", "content": "hi"}], "temperature": -1},
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6},
        {"messages": []},
        {"prompt": "hi"},
        {"messages": [{"role": "robot", "content": "hi"}]},
    ],
)
def test_bad_http_input_is_a_400_with_openai_error(cluster, body):
    status, reply = _post(cluster, "/v1/chat/completions", body)
    assert status == 400
    assert reply["error"]["type"] == "invalid_request_error" and reply["error"]["message"]


def test_bad_grpc_input_is_invalid_argument_and_cluster_survives(cluster, expected):
    channel, stub = _grpc_stub(cluster)
    with channel:
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(generate_pb2.GenerateRequest(prompt="hi", top_p=0.0))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:
            list(stub.GenerateStream(generate_pb2.GenerateRequest()))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status, body = _post(cluster, "/v1/chat/completions", _chat(PROMPTS[0]))
    assert status == 200 and body["choices"][0]["message"]["content"] == expected[0][0]


@pytest.mark.parametrize("api", [[], ["--grpc"], ["--stream"], ["--grpc", "--stream"]])
def test_specray_client(cluster, expected, capsys, api):
    args = ["client", PROMPTS[0], "--max-tokens", str(MAX_TOKENS), "--url", cluster.http_url]
    assert cli.main([*args, "--grpc-address", cluster.grpc_address, *api]) == 0
    assert capsys.readouterr().out == expected[0][0] + "\n"


# ---- what OpenAI clients send, and the features they expect (issue 15) ------------------------------
SHORT = 10  # tokens per request in this section: the features, not the length, are under test


@pytest.fixture(scope="module")
def engine(smollm2) -> LLMEngine:
    return LLMEngine(smollm2, NgramDrafter(), EngineConfig(num_speculative_tokens=5))


@pytest.fixture(scope="module")
def client(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.http_url + "/v1", api_key="unused", max_retries=0)


def _close(got: list[float], want: list[float]) -> bool:
    # The verifier batches differently from the in-process engine: equal up to float rounding.
    return len(got) == len(want) and all(abs(g - w) < 1e-3 for g, w in zip(got, want))


def _greedy(engine: LLMEngine, prompt: list[int]) -> list[int]:
    return engine.generate([prompt], SamplingParams(max_tokens=SHORT))[0].output_ids


def test_openai_client_chat_shapes_penalties_and_logprobs(cluster, client, engine):
    """Content parts, the developer role, neutral unsupported fields, penalties and top logprobs:
    greedy output and every token's logprob equal the engine's (the cluster schedules by confidence)."""
    reply = client.chat.completions.create(
        model=cluster.config.model,
        messages=[
            {"role": "developer", "content": "Answer in one line."},
            {
                "role": "user",
                "content": [{"type": "text", "text": PROMPTS[1]}, {"type": "text", "text": "Go."}],
            },
        ],
        max_tokens=SHORT,
        temperature=0,
        presence_penalty=0.6,
        frequency_penalty=0.4,
        extra_body={"repetition_penalty": 1.3},
        logprobs=True,
        top_logprobs=2,
        tools=None,
        tool_choice=None,
        response_format={"type": "text"},
    )
    assert reply.id.startswith("chatcmpl-") and reply.model == cluster.config.model
    prompt = engine.encode_prompt(
        messages=[
            {"role": "system", "content": "Answer in one line."},
            {"role": "user", "content": PROMPTS[1] + "\nGo."},
        ]
    )
    params = SamplingParams(
        max_tokens=SHORT, presence_penalty=0.6, frequency_penalty=0.4, repetition_penalty=1.3, logprobs=2
    )
    (seq,) = engine.generate([prompt], params)
    choice = reply.choices[0]
    assert choice.message.content == engine.output_text(seq)
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == len(seq.output_ids)
    tokens = choice.logprobs.content
    assert [t.token for t in tokens] == [engine.tokenizer.decode([i]) for i in seq.output_ids]
    assert _close([t.logprob for t in tokens], [lp.logprob for lp in seq.output_logprobs])
    assert [[x.token for x in t.top_logprobs] for t in tokens] == [
        [engine.tokenizer.decode([i]) for i, _ in lp.top] for lp in seq.output_logprobs
    ]


def test_openai_client_streams_n_seeded_choices(cluster, client):
    request = dict(
        model=cluster.config.model,
        messages=[{"role": "user", "content": PROMPTS[2]}],
        max_tokens=SHORT,
        temperature=1.0,
        seed=1234,
        n=2,
    )
    whole = client.chat.completions.create(**request)
    texts = [c.message.content for c in sorted(whole.choices, key=lambda c: c.index)]
    assert texts[0] != texts[1], "the choices share a seed"
    chunks = list(
        client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
    )
    streamed = {0: [], 1: []}
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        streamed[choice.index].append(choice.delta)
        assert chunk.usage is None and chunk.id.startswith("chatcmpl-")
    assert all(deltas[0].role == "assistant" and deltas[0].content == "" for deltas in streamed.values())
    assert ["".join(d.content or "" for d in streamed[i]) for i in (0, 1)] == texts  # seeded: reproducible
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # n = 1 with the same seed is the first choice.
    single = client.chat.completions.create(**{**request, "n": 1})
    assert single.choices[0].message.content == texts[0]


def test_completions_prompt_lists_token_ids_echo_and_logprobs(cluster, client, engine):
    ids = engine.tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    reply = client.completions.create(
        model=cluster.config.model,
        prompt=["Once upon a time", ids],
        max_tokens=6,
        temperature=0,
        echo=True,
        logprobs=1,
    )
    assert [c.index for c in reply.choices] == [0, 1]
    for choice, prompt in zip(reply.choices, ["Once upon a time", ids]):
        prompt_ids = engine.encode_prompt(prompt=prompt) if isinstance(prompt, str) else prompt
        (seq,) = engine.generate([prompt_ids], SamplingParams(max_tokens=6, logprobs=1, prompt_logprobs=1))
        prompt_text = prompt if isinstance(prompt, str) else engine.tokenizer.decode(prompt)
        assert choice.text == prompt_text + engine.output_text(seq)
        logprobs = choice.logprobs
        assert len(logprobs.tokens) == len(prompt_ids) + len(seq.output_ids)
        assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
        want = [lp.logprob for lp in seq.prompt_logprobs + seq.output_logprobs]
        assert _close(logprobs.token_logprobs[1:], want)
    assert reply.usage.prompt_tokens == len(engine.encode_prompt(prompt="Once upon a time")) + len(ids)


def test_the_model_is_checked_and_listed(cluster, client):
    (card,) = client.models.list().data
    assert card.id == cluster.config.model and card.created > 0
    assert client.models.retrieve(cluster.config.model).id == card.id
    for call in (
        lambda: client.models.retrieve("gpt-4"),
        lambda: client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}]),
        lambda: client.completions.create(model="../../etc/passwd", prompt="hi", max_tokens=2),
    ):
        with pytest.raises(openai.NotFoundError) as err:
            call()
        assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    channel, stub = _grpc_stub(cluster)
    with channel, pytest.raises(grpc.RpcError) as err:
        stub.Generate(generate_pb2.GenerateRequest(prompt="hi", model="gpt-4", max_tokens=2))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "body,status,param",
    [
        ({"max_tokens": True}, 400, "max_tokens"),
        ({"max_tokens": "4"}, 400, "max_tokens"),
        ({"stream": "yes"}, 400, "stream"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
        ({"response_format": {"type": "json_object"}}, 400, "response_format.type"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            400,
            "messages[0].content",
        ),
    ],
)
def test_refusals_over_http_name_their_field(cluster, body, status, param):
    reply_status, reply = _post(cluster, "/v1/chat/completions", {**_chat(PROMPTS[0]), **body})
    assert reply_status == status and reply["error"]["param"] == param, reply


def test_a_form_body_gets_a_clear_415(cluster):
    request = urllib.request.Request(
        cluster.http_url + "/v1/chat/completions", json.dumps(_chat(PROMPTS[0])).encode()
    )  # urllib, like curl -d, sends application/x-www-form-urlencoded
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=60)
    assert err.value.code == 415
    assert "Content-Type: application/json" in json.loads(err.value.read())["error"]["message"]


def test_grpc_choices_penalties_logprobs_and_inputs(cluster, engine):
    channel, stub = _grpc_stub(cluster)
    messages = [generate_pb2.ChatMessage(role="user", content=PROMPTS[3])]
    with channel:
        seeded = generate_pb2.GenerateRequest(
            messages=messages, max_tokens=SHORT, temperature=1.0, seed=9, n=2
        )
        reply = stub.Generate(seeded)
        assert [c.index for c in reply.choices] == [0, 1] and reply.choices[0].text != reply.choices[1].text
        assert reply.text == reply.choices[0].text  # the top-level fields repeat choice 0
        streamed = {0: "", 1: ""}
        for part in stub.GenerateStream(seeded):
            streamed[part.index] += part.text
        assert [streamed[0], streamed[1]] == [c.text for c in reply.choices]

        greedy = generate_pb2.GenerateRequest(
            messages=messages, max_tokens=SHORT, temperature=0, frequency_penalty=0.9, logprobs=1
        )
        reply = stub.Generate(greedy)
        prompt = engine.encode_prompt(messages=[{"role": "user", "content": PROMPTS[3]}])
        (seq,) = engine.generate(
            [prompt], SamplingParams(max_tokens=SHORT, frequency_penalty=0.9, logprobs=1)
        )
        assert (
            list(reply.token_ids) == seq.output_ids
            and [lp.token_id for lp in reply.logprobs] == seq.output_ids
        )
        assert _close([lp.logprob for lp in reply.logprobs], [lp.logprob for lp in seq.output_logprobs])

        by_ids = stub.Generate(
            generate_pb2.GenerateRequest(prompt_token_ids=prompt, max_tokens=SHORT, temperature=0)
        )
        assert list(by_ids.token_ids) == _greedy(engine, prompt)
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(generate_pb2.GenerateRequest(prompt="hi", messages=messages))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "exactly one" in err.value.details()
