"""How hard the router tries to finish a request whose verifier or draft worker dies."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Failover(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # How long a request whose path failed keeps trying to resume, from the failure (or the last
    # progress since): on the default deployment the replacement replica must start and load its
    # model first. 0: fail at once.
    deadline_s: float = Field(120.0, ge=0)
    # Wait before the first re-open, doubled for each next one up to max_backoff_s: a killed
    # replica's registration and Serve's routing table take a moment to forget it.
    backoff_s: float = Field(0.25, ge=0)
    max_backoff_s: float = Field(2.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_resumes" in data:
            raise ValueError("failover.max_resumes is now failover.deadline_s (seconds to keep resuming)")
        return data
