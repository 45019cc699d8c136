"""Bounds on a request's fields that both APIs share, checked before anything is tokenized.

Each protects a later stage: ids and sizes that must fit the internal protocol's integers, strings
that Redis keys and the tokenizer must accept, and a bound on the stop-string work per token. Every
refusal is a RequestError naming its field.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from specray.router.errors import RequestError

SESSION_ID = re.compile(r"[A-Za-z0-9._:@+=/-]{1,128}")
# `developer` is OpenAI's newer name for `system`: it reaches the chat template as `system`.
ROLES = frozenset({"system", "developer", "user", "assistant"})
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_SEED = 2**64 - 1  # the internal protocol's uint64
MAX_TOP_K = 2**31 - 1
# Choices of one request (n × prompts): each is a session of its own, and they are admitted together.
MAX_CHOICES = 16


def _encodable(text: str, param: str) -> None:
    # JSON may carry unpaired surrogates ("\ud800"), which are not UTF-8 and break the tokenizer.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RequestError(f"{param} is not valid Unicode text (unpaired surrogate)", param) from err


def check_request(
    *,
    prompts: Sequence[str | Sequence[int]] | None,
    messages: list[dict[str, str]] | None,
    stop: list[str],
    seed: int | None,
    top_k: int | None,
    session_id: str | None,
    n: int,
) -> None:
    """Raise RequestError naming the first field out of bounds."""
    for i, prompt in enumerate(prompts or ()):
        if isinstance(prompt, str):
            _encodable(prompt, "prompt" if len(prompts) == 1 else f"prompt[{i}]")
    for i, message in enumerate(messages or ()):
        if message.get("role") not in ROLES:
            raise RequestError(f"messages[{i}].role must be one of {sorted(ROLES)}", f"messages[{i}].role")
        _encodable(message.get("content", ""), f"messages[{i}].content")
    if len(stop) > MAX_STOP_STRINGS:
        raise RequestError(f"stop takes at most {MAX_STOP_STRINGS} strings", "stop")
    for s in stop:
        if not s or len(s) > MAX_STOP_CHARS:
            raise RequestError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters", "stop")
        _encodable(s, "stop")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise RequestError(f"seed must be in [0, {MAX_SEED}]", "seed")
    if top_k is not None and not 0 <= top_k <= MAX_TOP_K:
        raise RequestError(f"top_k must be in [0, {MAX_TOP_K}]", "top_k")
    if session_id is not None and not SESSION_ID.fullmatch(session_id):
        raise RequestError(
            "session_id must be 1 to 128 characters of letters, digits and ._:@+=/-", "session_id"
        )
    choices = n * (len(prompts) if prompts is not None else 1)
    if not 1 <= n or choices > MAX_CHOICES:
        raise RequestError(f"n × prompts must be in [1, {MAX_CHOICES}], got {choices}", "n")
    if session_id is not None and choices > 1:
        # A session keeps one conversation's KV on one verifier; several choices are several sessions.
        raise RequestError(
            "session_id cannot be combined with several choices (n > 1 or many prompts)", "session_id"
        )
