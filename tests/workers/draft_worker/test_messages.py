"""The router <-> draft worker messages: their invariants, and that they survive Ray's pickling."""

from __future__ import annotations

import pickle

import pytest
from ray import cloudpickle

from specray.workers.draft_worker.messages import SessionChunk, SessionRequest
from specray.workers.engine.sampling import SamplingParams, TokenLogprob

PARAMS = SamplingParams(max_tokens=8, temperature=0.7, seed=3, stop=("\n",))


def _request(**overrides) -> SessionRequest:
    fields = dict(
        session_id="s",
        verifier_address="127.0.0.1:1",
        prompt_ids=[1, 2, 3],
        params=PARAMS,
        max_context=64,
        output_ids=[4],
        trace_context={"traceparent": "00-abc-def-01"},
    )
    return SessionRequest(**{**fields, **overrides})


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps])
def test_messages_round_trip_through_pickle(dumps):
    request = _request()
    chunks = [
        SessionChunk(tokens=[5, 6], num_drafts=3, accepted=1),
        SessionChunk(tokens=[7], finished=True, finish_reason="stop", stop_text_len=2),
        SessionChunk(
            tokens=[8],
            logprobs=[TokenLogprob(8, -0.5, ((8, -0.5),))],
            prompt_logprobs=[TokenLogprob(2, -1.0)],
        ),
        SessionChunk.failure("STALE: old segment", "STALE"),
    ]
    for message in (request, *chunks):
        assert pickle.loads(dumps(message)) == message


def test_request_normalises_its_sequences():
    request = _request()
    assert request.prompt_ids == (1, 2, 3) and request.output_ids == (4,)
    assert request.trace_context == (("traceparent", "00-abc-def-01"),)
    hash(request)  # frozen all the way down
    with pytest.raises(AttributeError):
        request.session_id = "t"


@pytest.mark.parametrize(
    "overrides",
    [
        {"session_id": ""},
        {"verifier_address": ""},
        {"prompt_ids": []},
        {"prompt_ids": [1, -2]},
        {"output_ids": [1.5]},
        {"max_context": 0},
        {"max_context": True},
        {"max_context": 3},  # prompt + output do not fit
    ],
)
def test_request_refuses_bad_fields(overrides):
    with pytest.raises(ValueError):
        _request(**overrides)


def test_request_needs_sampling_params():
    with pytest.raises(TypeError):
        _request(params={"max_tokens": 8})


@pytest.mark.parametrize(
    "fields",
    [
        {"num_drafts": -1},
        {"num_drafts": 1, "accepted": 2},
        {"finished": True},  # no finish_reason
        {"finish_reason": "stop"},  # not finished
        {"finished": True, "finish_reason": ""},
        {"stop_text_len": 3},  # not finished
        {"error": "boom"},  # no code
        {"code": "STALE"},  # no message
        {"error": "boom", "code": "STALE", "tokens": [1]},
        {"error": "boom", "code": "STALE", "finished": True, "finish_reason": "stop"},
        {"tokens": [-1]},
        {"tokens": [1, 2], "logprobs": [TokenLogprob(1, -0.1)]},  # one logprob per token
        {"tokens": [1], "logprobs": [TokenLogprob(2, -0.1)]},  # of the token itself
        {"error": "boom", "code": "STALE", "prompt_logprobs": [TokenLogprob(2, -0.1)]},
    ],
)
def test_chunk_refuses_inconsistent_fields(fields):
    with pytest.raises(ValueError):
        SessionChunk(**fields)


def test_failure_chunk():
    chunk = SessionChunk.failure("verifier gone", "UNAVAILABLE")
    assert chunk.failed and chunk.code == "UNAVAILABLE" and chunk.tokens == ()
    assert not SessionChunk(tokens=[1]).failed
