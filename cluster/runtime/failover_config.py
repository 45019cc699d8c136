"""How hard the router tries to finish a request whose verifier or draft worker dies."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Failover(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_resumes: int = Field(4, ge=0)  # re-opens of one request on a live verifier; 0: fail at once
    # Wait before the first re-open, doubled for each next one: a killed replica's registration and
    # Serve's routing table take a moment to forget it.
    backoff_s: float = Field(0.25, ge=0)
