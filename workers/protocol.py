"""Conversions between engine types and the messages of the internal draft/verify protocol."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from specray.protos.specray.v1 import verify_pb2
from specray.workers.engine.sampling import SamplingParams, TokenLogprob


def encode_tensor(tensor: torch.Tensor) -> verify_pb2.Tensor:
    array = tensor.detach().to(torch.float32).cpu().contiguous().numpy()
    return verify_pb2.Tensor(shape=list(array.shape), data=array.astype("<f4").tobytes())


def decode_tensor(message: verify_pb2.Tensor) -> torch.Tensor:
    shape = tuple(message.shape)
    size = int(np.prod(shape)) * 4
    if size != len(message.data):
        raise ValueError(f"tensor of shape {shape} needs {size} bytes, got {len(message.data)}")
    return torch.from_numpy(np.frombuffer(message.data, dtype="<f4").copy()).reshape(shape)


def encode_params(params: SamplingParams) -> verify_pb2.SamplingParams:
    return verify_pb2.SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        seed=params.seed,
        stop=list(params.stop),
        ignore_eos=params.ignore_eos,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty,
        logprobs=params.logprobs,
        prompt_logprobs=params.prompt_logprobs,
    )


def decode_params(message: verify_pb2.SamplingParams) -> SamplingParams:
    """Validated sampling parameters (raises ValueError on bad values)."""
    return SamplingParams(
        max_tokens=message.max_tokens,
        temperature=message.temperature,
        top_p=message.top_p,
        top_k=message.top_k,
        seed=message.seed if message.HasField("seed") else None,
        stop=tuple(message.stop),
        ignore_eos=message.ignore_eos,
        presence_penalty=message.presence_penalty,
        frequency_penalty=message.frequency_penalty,
        repetition_penalty=message.repetition_penalty if message.HasField("repetition_penalty") else 1.0,
        logprobs=message.logprobs if message.HasField("logprobs") else None,
        prompt_logprobs=message.prompt_logprobs if message.HasField("prompt_logprobs") else None,
    )


def encode_logprobs(logprobs: list[TokenLogprob]) -> list[verify_pb2.TargetLogprob]:
    return [
        verify_pb2.TargetLogprob(
            token=lp.token,
            logprob=lp.logprob,
            top_tokens=[t for t, _ in lp.top],
            top_logprobs=[v for _, v in lp.top],
        )
        for lp in logprobs
    ]


def decode_logprobs(messages: Iterable[verify_pb2.TargetLogprob]) -> tuple[TokenLogprob, ...]:
    """Raises ValueError when a message's top tokens and top logprobs differ in number."""
    decoded = []
    for m in messages:
        if len(m.top_tokens) != len(m.top_logprobs):
            raise ValueError("a logprob's top_tokens and top_logprobs differ in length")
        decoded.append(TokenLogprob(m.token, m.logprob, tuple(zip(m.top_tokens, m.top_logprobs))))
    return tuple(decoded)
