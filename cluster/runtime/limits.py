"""Request limits the router enforces before any work is placed: admission and sizes."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class RequestLimits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Requests generating at once per router replica; one more gets HTTP 429 / gRPC
    # RESOURCE_EXHAUSTED with Retry-After. Keep it below router.max_ongoing_requests: above that,
    # Serve queues HTTP requests before the router can refuse them.
    max_concurrent_requests: int = Field(48, ge=1)
    retry_after_s: int = Field(1, ge=1)  # the Retry-After a refused client is given
    # Largest HTTP body and gRPC request message; bigger ones are refused unread (413 /
    # RESOURCE_EXHAUSTED). A prompt that fills the model's context is far smaller.
    max_body_bytes: int = Field(1 << 20, ge=1024)
