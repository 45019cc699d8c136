"""Bounds on a request's fields that both APIs share, checked before anything is tokenized.

Each protects a later stage: ids and sizes that must fit the internal protocol's integers, strings
that Redis keys and the tokenizer must accept, and a bound on the stop-string work per token.
"""

from __future__ import annotations

import re

SESSION_ID = re.compile(r"[A-Za-z0-9._:@+=/-]{1,128}")
ROLES = frozenset({"system", "user", "assistant"})
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_SEED = 2**64 - 1  # the internal protocol's uint64
MAX_TOP_K = 2**31 - 1


def _encodable(text: str, what: str) -> None:
    # JSON may carry unpaired surrogates ("\ud800"), which are not UTF-8 and break the tokenizer.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{what} is not valid Unicode text (unpaired surrogate)") from err


def check_request(
    *,
    prompt: str | None,
    messages: list[dict[str, str]] | None,
    stop: list[str],
    seed: int | None,
    top_k: int | None,
    session_id: str | None,
) -> None:
    """Raise ValueError naming the first field out of bounds."""
    if prompt is not None:
        _encodable(prompt, "prompt")
    for i, message in enumerate(messages or ()):
        if message.get("role") not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {sorted(ROLES)}")
        _encodable(message.get("content", ""), f"messages[{i}].content")
    if len(stop) > MAX_STOP_STRINGS:
        raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings")
    for s in stop:
        if not s or len(s) > MAX_STOP_CHARS:
            raise ValueError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters")
        _encodable(s, "stop")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, {MAX_SEED}]")
    if top_k is not None and not 0 <= top_k <= MAX_TOP_K:
        raise ValueError(f"top_k must be in [0, {MAX_TOP_K}]")
    if session_id is not None and not SESSION_ID.fullmatch(session_id):
        raise ValueError("session_id must be 1 to 128 characters of letters, digits and ._:@+=/-")
