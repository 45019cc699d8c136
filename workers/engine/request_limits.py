"""What a request may use: the context check and the draft limit, the same for every driver.

The engine, the verifier, the draft worker and the router all apply these, so they never disagree
about whether a request fits or how many drafts a step can use.
"""

from __future__ import annotations


def check_context(prompt_len: int, max_tokens: int, max_context: int) -> None:
    """Raise ValueError unless the prompt and its whole generation fit the model's context."""
    if prompt_len + max_tokens > max_context:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the model's context of "
            f"{max_context} tokens"
        )


def draft_limit(
    num_speculative_tokens: int,
    max_tokens: int,
    num_output: int,
    num_tokens: int,
    max_context: int,
    budget: int | None = None,
) -> int:
    """The most drafts a step can use: γ, the step's budget, and what the request has left.

    A step always emits one target token after the accepted drafts, so drafting past
    max_tokens − 1 (or the context − 1) could never be used.
    """
    limit = min(num_speculative_tokens, max_tokens - num_output - 1, max_context - num_tokens - 1)
    if budget is not None:
        limit = min(limit, budget)
    return max(0, limit)
