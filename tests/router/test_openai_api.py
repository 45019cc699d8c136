"""The OpenAI-compatible HTTP layer without a cluster: the request bodies real clients send (the
official `openai` client's own, through a mock transport), strict types and refusals that name
their field, the reply shapes the client parses, and how a request becomes choices.

The cluster tests (tests/cluster/test_cluster_e2e.py) send the same requests to a real cluster.
"""

from __future__ import annotations

import json

import httpx2 as httpx
import openai
import pytest
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import ValidationError
from transformers import AutoTokenizer

from specray.router import router as router_module
from specray.router.errors import RequestError
from specray.router.generation import Delta, Generation, GenerationRequest, choice_seed
from specray.router.http_guard import GuardSettings, HttpGuard
from specray.router.openai_responses import Responder, TokenText
from specray.router.openai_schema import ChatCompletionRequest, CompletionRequest
from specray.workers.engine.sampling import SamplingParams, TokenLogprob
from specray.workers.models.loader import load_config

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(load_config(MODEL)[0])


@pytest.fixture(scope="module")
def generation(tokenizer) -> Generation:
    # build() needs only the tokenizer and the limits; nothing is placed.
    return Generation(tokenizer, 8192, 64, None, None, None, model=MODEL)


def _app() -> TestClient:
    """The router's validation and error handlers and its HTTP guard, on the request models."""
    app = FastAPI()
    app.add_middleware(HttpGuard)
    app.add_exception_handler(RequestValidationError, router_module._validation_error)
    app.add_exception_handler(RequestError, router_module._request_error)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> dict:
        body.check()
        return {"messages": [m.template_dict() for m in body.messages]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> dict:
        body.check()
        return {"prompt": body.prompt}

    @app.post("/fault")
    async def fault() -> dict:
        raise RuntimeError("boom")

    app.add_exception_handler(Exception, router_module._server_fault)
    HttpGuard.configure(GuardSettings(None, 1 << 20))
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client() -> TestClient:
    return _app()


# ---- what clients send ------------------------------------------------------------------------------
def _sent_by_openai_client(call) -> dict:
    """The JSON body the official client sends for `call(client)`."""
    sent = {}

    def handler(request: httpx.Request) -> httpx.Response:
        sent.update(json.loads(request.content))
        return httpx.Response(500, json={"error": {"message": "not served here"}})

    client = openai.OpenAI(
        base_url="http://127.0.0.1:1/v1",
        api_key="x",
        max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
    )
    with pytest.raises(openai.InternalServerError):
        call(client)
    return sent


def test_the_openai_clients_requests_are_accepted(client):
    chat = _sent_by_openai_client(
        lambda c: c.chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}],
                },
                {"role": "assistant", "content": "Hello!", "tool_calls": []},
                {"role": "user", "content": "Name a planet."},
            ],
            max_completion_tokens=8,
            temperature=0.5,
            top_p=0.9,
            n=2,
            seed=7,
            stop=["\n"],
            logprobs=True,
            top_logprobs=3,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            response_format={"type": "text"},
            stream=True,
            stream_options={"include_usage": True},
            user="u-1",
        )
    )
    reply = client.post("/v1/chat/completions", json=chat)
    assert reply.status_code == 200, reply.json()
    messages = reply.json()["messages"]
    assert messages[0] == {"role": "developer", "content": "Be brief."}
    assert messages[1]["content"] == "Hi\nthere"  # text parts joined as vLLM joins them
    completion = _sent_by_openai_client(
        lambda c: c.completions.create(
            model=MODEL, prompt=[[1, 2, 3], [4, 5]], max_tokens=4, echo=True, logprobs=2, best_of=1
        )
    )
    reply = client.post("/v1/completions", json=completion)
    assert reply.status_code == 200 and reply.json()["prompt"] == [[1, 2, 3], [4, 5]]


def test_neutral_values_of_unsupported_fields_are_accepted(client):
    # What LangChain, LlamaIndex and chat UIs send when they use none of these features.
    neutral = {
        "logprobs": False,
        "top_logprobs": None,
        "tools": None,
        "tool_choice": None,
        "parallel_tool_calls": False,
        "functions": [],
        "function_call": None,
        "logit_bias": {},
        "response_format": None,
        "modalities": ["text"],
        "audio": None,
        "store": False,
        "metadata": None,
        "service_tier": "auto",
        "stream": None,
        "stream_options": None,
        "n": None,
        "max_tokens": None,
        "seed": None,
        "stop": None,
        "temperature": None,
        "presence_penalty": None,
        "reasoning_effort": None,
        "prediction": None,
    }
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi", "name": "ann"}], **neutral}
    reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.json()
    assert reply.json()["messages"] == [{"role": "user", "content": "hi", "name": "ann"}]
    neutral = {
        "echo": False,
        "logprobs": None,
        "suffix": None,
        "best_of": None,
        "logit_bias": None,
        "user": None,
    }
    reply = client.post("/v1/completions", json={"prompt": "hi", **neutral})
    assert reply.status_code == 200, reply.json()


CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    "body,param,words",
    [
        ({**CHAT, "max_tokens": True}, "max_tokens", "valid integer"),
        ({**CHAT, "max_tokens": "4"}, "max_tokens", "valid integer"),
        ({**CHAT, "max_tokens": 4.0}, "max_tokens", "valid integer"),
        ({**CHAT, "stream": "yes"}, "stream", "valid boolean"),
        ({**CHAT, "temperature": "0.5"}, "temperature", "valid number"),
        ({**CHAT, "n": 17}, "n", "less than or equal to 16"),
        ({**CHAT, "presence_penalty": 2.5}, "presence_penalty", "less than or equal to 2"),
        ({**CHAT, "frequency_penalty": -3}, "frequency_penalty", "greater than or equal to -2"),
        ({**CHAT, "repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
        ({**CHAT, "top_logprobs": 21, "logprobs": True}, "top_logprobs", "less than or equal to 20"),
        ({**CHAT, "top_logprobs": 2}, "top_logprobs", "needs logprobs"),
        ({**CHAT, "logprobs": 1}, "logprobs", "valid boolean"),
        ({**CHAT, "tools": [{"type": "function"}]}, "tools", "not supported"),
        ({**CHAT, "tool_choice": "auto"}, "tool_choice", "not supported"),
        ({**CHAT, "response_format": {"type": "json_object"}}, "response_format.type", "json_object"),
        ({**CHAT, "response_format": {"type": "json_schema"}}, "response_format.type", "json_schema"),
        ({**CHAT, "logit_bias": {"50256": -100}}, "logit_bias", "not supported"),
        ({**CHAT, "stream_options": {"include_usage": True}}, "stream_options", "stream is true"),
        ({**CHAT, "stop": 1}, "stop", "string or a list of strings"),
        ({**CHAT, "bogus": 1}, "bogus", "unknown field"),
        ({"messages": [{"role": "user", "content": "x", "extra": 1}]}, "messages[0].extra", "unknown field"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "tool messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "developer"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content",
            "image_url",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
            "messages[0].content",
            "input_audio",
        ),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "string or a list"),
        ({**CHAT, "stop": ["a", 2]}, "stop[1]", "valid string"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages[0].content[0].text",
            "required",
        ),
        ({"messages": []}, "messages", "at least 1"),
    ],
)
def test_refusals_name_their_field(client, body, param, words):
    reply = client.post("/v1/chat/completions", json=body)
    error = reply.json()["error"]
    assert reply.status_code == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == param and words in error["message"], error


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": []}, "prompt"),
        ({"prompt": [[1, 2], "x", 5]}, "prompt"),
        ({"prompt": [True]}, "prompt"),
        ({"prompt": "x", "echo": "yes"}, "echo"),
        ({"prompt": "x", "logprobs": True}, "logprobs"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "best_of": 2}, "best_of"),
        ({"prompt": "x", "suffix": "end"}, "suffix"),
        ({}, "prompt"),
    ],
)
def test_completion_refusals_name_their_field(client, body, param):
    reply = client.post("/v1/completions", json=body)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.json()


def test_body_level_problems_say_what_is_wrong(client):
    reply = client.post(
        "/v1/chat/completions", content=b'{"messages": [', headers={"Content-Type": "application/json"}
    )
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]["message"]
    reply = client.post("/v1/chat/completions", json=[1])
    assert reply.status_code == 400 and reply.json()["error"]["message"] == "the body must be a JSON object"
    # curl's -d sends a form: a 415 that names the content type (as vLLM answers).
    reply = client.post(
        "/v1/chat/completions", content=json.dumps(CHAT), headers={"Content-Type": "text/plain"}
    )
    assert reply.status_code == 415 and "Content-Type: application/json" in reply.json()["error"]["message"]


def test_a_server_fault_is_a_500_server_error(client):
    reply = client.post("/fault", json={})
    assert reply.status_code == 500
    assert reply.json()["error"]["type"] == "server_error" and "boom" in reply.json()["error"]["message"]


def test_models_validate_without_http():
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({**CHAT, "max_tokens": True})
    request = CompletionRequest.model_validate({"prompt": [7, 8]})
    assert request.prompt == [[7, 8]]  # one prompt of token ids


# ---- from request to choices ------------------------------------------------------------------------
def _build(generation: Generation, **fields) -> list[GenerationRequest]:
    defaults = dict(
        prompts=None,
        messages=None,
        max_tokens=4,
        temperature=None,
        top_p=None,
        top_k=None,
        seed=None,
        stop=[],
    )
    return generation.build(**{**defaults, "session_id": None, **fields})


def test_n_choices_are_independent_sessions_with_derived_seeds(generation):
    choices = _build(
        generation, messages=[{"role": "user", "content": "hi"}], n=3, seed=42, id_prefix="chatcmpl"
    )
    assert [c.index for c in choices] == [0, 1, 2]
    assert len({c.session_id for c in choices}) == 3 and len({c.request_id for c in choices}) == 1
    assert choices[0].request_id.startswith("chatcmpl-")
    seeds = [c.params.seed for c in choices]
    assert seeds[0] == 42 and len(set(seeds)) == 3  # choice 0 is what n = 1 gives
    assert seeds == [choice_seed(42, i) for i in range(3)]  # reproducible
    unseeded = _build(generation, prompts=["a"], n=2)
    assert all(c.params.seed is None for c in unseeded)


def test_prompt_lists_and_token_ids(generation, tokenizer):
    choices = _build(generation, prompts=["Hello there", [9, 10, 11]], n=2, logprobs=1, prompt_logprobs=1)
    assert [c.index for c in choices] == [0, 1, 2, 3]
    assert choices[0].prompt_ids == tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    assert choices[2].prompt_ids == [9, 10, 11] and choices[2].prompt_text == tokenizer.decode([9, 10, 11])
    # A prompt's logprobs are the same for all its choices: only its first choice computes them.
    assert [c.params.prompt_logprobs for c in choices] == [1, None, 1, None]
    assert all(c.params.logprobs == 1 for c in choices)


def test_developer_messages_reach_the_template_as_system(generation, tokenizer):
    (developer,) = _build(generation, messages=[{"role": "developer", "content": "Be brief."}])
    (system,) = _build(generation, messages=[{"role": "system", "content": "Be brief."}])
    assert developer.prompt_ids == system.prompt_ids


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"prompts": [[1, 99_999_999]]}, "prompt"),
        ({"prompts": ["a", [True]]}, "prompt[1]"),
        ({"prompts": [""]}, "prompt"),
        ({"prompts": ["a"] * 4, "n": 5}, "n"),
        ({"prompts": ["a"], "n": 2, "session_id": "s"}, "session_id"),
        ({"prompts": ["a"], "max_tokens": 9000}, "max_tokens"),
        ({"prompts": ["a"], "presence_penalty": 3.0}, "presence_penalty"),
        ({"prompts": ["a"], "repetition_penalty": 11.0}, "repetition_penalty"),
        ({"prompts": ["a"], "logprobs": 30}, "logprobs"),
        ({"prompts": ["a"], "temperature": -1.0}, "temperature"),
        ({"prompts": ["a"], "stop": ["x" * 300]}, "stop"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"prompts": ["a"], "messages": [{"role": "user", "content": "x"}]}, "prompt"),
    ],
)
def test_build_refusals_name_their_field(generation, fields, param):
    with pytest.raises(RequestError) as err:
        _build(generation, **fields)
    assert err.value.param == param, err.value


def test_the_model_is_checked(generation):
    generation.check_model(MODEL)
    generation.check_model(None)
    with pytest.raises(LookupError, match="gpt-4"):
        generation.check_model("gpt-4")


# ---- reply shapes the client parses -----------------------------------------------------------------
def _request(index: int = 0, prompt_ids: list[int] | None = None) -> GenerationRequest:
    return GenerationRequest(
        prompt_ids or [1, 2, 3], SamplingParams(), f"s{index}", "chatcmpl-1", 1000, index, "Hi"
    )


def _lp(token: int, value: float, *top: tuple[int, float]) -> TokenLogprob:
    return TokenLogprob(token, value, top)


def test_chat_replies_parse_in_the_openai_client(tokenizer):
    requests = [_request(0), _request(1)]
    deltas = [
        Delta("Hello", [19556], "stop", 1, 1, 0, 0, [_lp(19556, -0.5, (19556, -0.5), (28120, -1.5))]),
        Delta(
            "Hey", [28120], "length", 1, 1, 2, 1, [_lp(28120, float("-inf"), (19556, -0.1), (28120, -9e9))]
        ),
    ]
    responder = Responder(requests, MODEL, TokenText(tokenizer), chat=True, n=2, logprobs=True)
    body = responder.whole(deltas)
    reply = ChatCompletion.model_validate(body)
    assert [c.message.content for c in reply.choices] == ["Hello", "Hey"]
    assert reply.choices[0].logprobs.content[0].top_logprobs[1].logprob == -1.5
    assert reply.choices[1].logprobs.content[0].logprob == -9999.0  # no -inf in JSON
    assert reply.usage.prompt_tokens == 3 and reply.usage.completion_tokens == 2
    assert body["session_id"] is None and body["speculation"]["draft_tokens"] == 2


def _stream(responder: Responder, items: list[tuple[int, Delta]]) -> list[dict]:
    import asyncio

    async def rest():
        for item in items[1:]:
            yield item

    async def collect():
        return [e async for e in responder.events(items[0], rest())]

    events = asyncio.run(collect())
    assert events[-1] == "data: [DONE]\n\n"
    return [json.loads(e.removeprefix("data: ")) for e in events[:-1]]


def test_chat_streams_open_with_role_deltas_and_end_with_usage(tokenizer):
    requests = [_request(0), _request(1)]
    items = [
        (1, Delta("A", [32], logprobs=[_lp(32, -0.2)])),
        (0, Delta("B", [33], "stop", 1, 1, 0, 0, [_lp(33, -0.3)])),
        (1, Delta("C", [34], "length", 2, 2, 1, 1, [_lp(34, -0.4)])),
    ]
    responder = Responder(
        requests, MODEL, TokenText(tokenizer), chat=True, n=2, logprobs=True, include_usage=True
    )
    events = _stream(responder, items)
    chunks = [ChatCompletionChunk.model_validate(e) for e in events]
    assert [(c.choices[0].index, c.choices[0].delta.role) for c in chunks[:2]] == [
        (0, "assistant"),
        (1, "assistant"),
    ]
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].usage.prompt_tokens == 3
    assert events[-1]["speculation"]["verify_steps"] == 3
    assert chunks[2].choices[0].logprobs.content[0].logprob == pytest.approx(-0.2)
    # Without include_usage, each choice's last chunk carries its own usage.
    responder = Responder(requests, MODEL, TokenText(tokenizer), chat=True, n=2)
    events = _stream(responder, items)
    assert "usage" not in events[2] and events[3]["usage"]["completion_tokens"] == 1
    assert events[4]["usage"]["completion_tokens"] == 2 and events[3]["choices"][0]["logprobs"] is None


def test_echoed_completions_carry_the_prompts_logprobs(tokenizer):
    prompt = tokenizer("The sky is", add_special_tokens=False)["input_ids"]
    (blue,) = tokenizer(" blue", add_special_tokens=False)["input_ids"]
    request = GenerationRequest(prompt, SamplingParams(), "s", "cmpl-1", 1000, 0, "The sky is")
    delta = Delta(
        " blue",
        [blue],
        "length",
        1,
        1,
        0,
        0,
        [_lp(blue, -0.7, (blue, -0.7))],
        [_lp(t, -1.0 - i, (t, -1.0 - i)) for i, t in enumerate(prompt[1:])],
    )
    responder = Responder([request], MODEL, TokenText(tokenizer), chat=False, logprobs=True, echo=True)
    # OpenAI's own shape, which the client's strict Completion type cannot hold: the echoed prompt's
    # first token has a null logprob (the client reads it leniently).
    choice = responder.whole([delta])["choices"][0]
    assert choice["text"] == "The sky is blue"
    assert choice["logprobs"]["tokens"] == ["The", " sky", " is", " blue"]
    assert choice["logprobs"]["token_logprobs"] == [None, -1.0, -2.0, -0.7]
    assert choice["logprobs"]["top_logprobs"][0] is None
    assert choice["logprobs"]["top_logprobs"][3] == {" blue": -0.7}
    assert choice["logprobs"]["text_offset"] == [0, 3, 7, 10]
    plain = Responder([request], MODEL, TokenText(tokenizer), chat=False, logprobs=True).whole([delta])
    Completion.model_validate(plain)
    assert plain["choices"][0]["text"] == " blue" and plain["choices"][0]["logprobs"]["text_offset"] == [0]
