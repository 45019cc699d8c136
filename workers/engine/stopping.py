"""Committing generated tokens under the stop conditions: stop tokens, stop strings, length."""

from __future__ import annotations

from collections.abc import Collection

from transformers import PreTrainedTokenizerBase

from specray.workers.engine.sequence import Sequence


def append_tokens(
    seq: Sequence,
    tokens: list[int],
    stop_token_ids: Collection[int],
    tokenizer: PreTrainedTokenizerBase,
    max_context: int,
) -> list[int]:
    """Commit tokens one by one until a stop condition finishes `seq`; returns the tokens committed."""
    stop_ids = () if seq.params.ignore_eos else stop_token_ids
    committed = []
    for token in tokens:
        seq.output_ids.append(token)
        committed.append(token)
        if token in stop_ids:
            seq.finish("stop")
        elif seq.params.stop and matches_stop(seq, tokenizer):
            seq.finish("stop")
        elif len(seq.output_ids) >= seq.params.max_tokens or seq.num_tokens >= max_context:
            seq.finish("length")
        if seq.finished:
            break
    return committed


def matches_stop(seq: Sequence, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the output text now holds a stop string; records where the text is cut."""
    text = tokenizer.decode(seq.output_ids, skip_special_tokens=True)
    # Only the tail can hold a new match: the text before the last token was checked already.
    tail_start = max(0, len(text) - max(map(len, seq.params.stop)) - 32)
    hits = [pos for s in seq.params.stop if (pos := text.find(s, tail_start)) >= 0]
    if hits:
        seq.stop_text_len = min(hits)
    return bool(hits)
