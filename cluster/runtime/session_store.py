"""Session metadata and the verifier registry in Redis.

Keys (all with TTLs, so a crashed replica's state ages out):
- `specray:session:<id>` hash: owner verifier, draft worker, prompt and committed token ids, KV
  length, sampling params, status, acceptance counters, drafts verified at each step.
- `specray:verifier:<id>` hash: the verifier's gRPC address, active session count and Ray node id,
  refreshed by its heartbeat.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from redis.asyncio.client import Pipeline

from specray.cluster.runtime.redis_client import connect

SESSION_PREFIX = "specray:session:"
VERIFIER_PREFIX = "specray:verifier:"
# A verifier refreshes its registration every VERIFIER_HEARTBEAT_S; one that misses it for
# VERIFIER_TTL_S has died (or is wedged) and drops out of placement and `/health`.
VERIFIER_HEARTBEAT_S = 1.0
VERIFIER_TTL_S = 4
_DELETE_IF_OWNED = """
if redis.call('hget', KEYS[1], 'verifier') == ARGV[1] and redis.call('hget', KEYS[1], 'draft_worker') == ARGV[2] then
  return redis.call('del', KEYS[1])
end
return 0
"""


@dataclass(frozen=True)
class VerifierInfo:
    verifier_id: str
    address: str
    active_sessions: int


class SessionStore:
    def __init__(self, url: str, session_ttl_s: int = 600, finished_ttl_s: int = 60) -> None:
        self.redis = connect(url)
        self.session_ttl_s = session_ttl_s
        self.finished_ttl_s = finished_ttl_s

    async def close(self) -> None:
        await self.redis.aclose()

    # ---- sessions -------------------------------------------------------------------------------
    async def open_session(
        self,
        session_id: str,
        verifier_id: str,
        draft_worker: str,
        prompt_ids: list[int],
        params: dict[str, Any],
        output_ids: list[int] | None = None,
    ) -> None:
        """A session starts, or resumes here with the output it had already committed elsewhere."""
        async with self.redis.pipeline(transaction=True) as pipe:
            self.stage_open(pipe, session_id, verifier_id, draft_worker, prompt_ids, params, output_ids)
            await pipe.execute()

    async def record_step(
        self,
        session_id: str,
        output_ids: list[int],
        kv_len: int,
        num_drafts: int,
        accepted: int,
        finish_reason: str | None,
        verify_lengths: list[int] | None = None,
    ) -> None:
        """One verify step; `verify_lengths` (drafts verified at each step so far) when recorded."""
        async with self.redis.pipeline(transaction=True) as pipe:
            self.stage_step(
                pipe, session_id, output_ids, kv_len, num_drafts, accepted, finish_reason, verify_lengths
            )
            await pipe.execute()

    # The same writes added to a caller's pipeline, so that one round trip carries many of them.
    def stage_open(
        self,
        pipe: Pipeline,
        session_id: str,
        verifier_id: str,
        draft_worker: str,
        prompt_ids: list[int],
        params: dict[str, Any],
        output_ids: list[int] | None = None,
    ) -> None:
        key = SESSION_PREFIX + session_id
        pipe.delete(key)
        pipe.hset(
            key,
            mapping={
                "verifier": verifier_id,
                "draft_worker": draft_worker,
                "prompt_ids": json.dumps(prompt_ids),
                "output_ids": json.dumps(output_ids or []),
                "kv_len": 0,
                "params": json.dumps(params),
                "status": "running",
                "verify_steps": 0,
                "draft_tokens": 0,
                "accepted_tokens": 0,
            },
        )
        pipe.expire(key, self.session_ttl_s)

    def stage_step(
        self,
        pipe: Pipeline,
        session_id: str,
        output_ids: list[int],
        kv_len: int,
        num_drafts: int,
        accepted: int,
        finish_reason: str | None,
        verify_lengths: list[int] | None = None,
    ) -> None:
        key = SESSION_PREFIX + session_id
        pipe.hset(key, mapping={"output_ids": json.dumps(output_ids), "kv_len": kv_len})
        if verify_lengths is not None:
            pipe.hset(key, "verify_lengths", json.dumps(verify_lengths))
        pipe.hincrby(key, "verify_steps", 1)
        pipe.hincrby(key, "draft_tokens", num_drafts)
        pipe.hincrby(key, "accepted_tokens", accepted)
        if finish_reason:
            pipe.hset(key, mapping={"status": "finished", "finish_reason": finish_reason})
            pipe.expire(key, self.finished_ttl_s)
        else:
            pipe.expire(key, self.session_ttl_s)

    def stage_delete(self, pipe: Pipeline, session_id: str, owner: tuple[str, str]) -> None:
        """Delete the record while it still names `owner` (verifier, draft worker)."""
        pipe.eval(_DELETE_IF_OWNED, 1, SESSION_PREFIX + session_id, *owner)

    async def get_session(self, session_id: str) -> dict[str, str] | None:
        record = await self.redis.hgetall(SESSION_PREFIX + session_id)
        return record or None

    async def delete_session(self, session_id: str, owner: tuple[str, str] | None = None) -> None:
        """Delete the record; with owner=(verifier, draft worker), only while it still names them (a
        session resumed elsewhere meanwhile keeps its new record)."""
        if owner is None:
            await self.redis.delete(SESSION_PREFIX + session_id)
        else:
            await self.redis.eval(_DELETE_IF_OWNED, 1, SESSION_PREFIX + session_id, *owner)

    async def committed_output(self, session_id: str, prompt_ids: list[int]) -> list[int] | None:
        """The output a still-running session of this prompt has committed, or None (no such record)."""
        record = await self.get_session(session_id)
        if record is None or record.get("status") != "running" or "output_ids" not in record:
            return None
        if json.loads(record.get("prompt_ids", "null")) != prompt_ids:
            return None
        return json.loads(record["output_ids"])

    async def session_ids(self) -> list[str]:
        return [key[len(SESSION_PREFIX) :] async for key in self.redis.scan_iter(match=SESSION_PREFIX + "*")]

    # ---- verifier registry ----------------------------------------------------------------------
    async def heartbeat_verifier(
        self,
        verifier_id: str,
        address: str,
        active_sessions: int,
        ttl_s: int = VERIFIER_TTL_S,
        node_id: str = "",
    ) -> None:
        """Register (or refresh) a verifier; `node_id`: the Ray node it runs on, for operators."""
        key = VERIFIER_PREFIX + verifier_id
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                key, mapping={"address": address, "active_sessions": active_sessions, "node_id": node_id}
            )
            pipe.expire(key, ttl_s)
            await pipe.execute()

    async def unregister_verifier(self, verifier_id: str) -> None:
        await self.redis.delete(VERIFIER_PREFIX + verifier_id)

    async def live_verifiers(self) -> list[VerifierInfo]:
        verifiers = []
        async for key in self.redis.scan_iter(match=VERIFIER_PREFIX + "*"):
            record = await self.redis.hgetall(key)
            if record:
                verifiers.append(
                    VerifierInfo(
                        key[len(VERIFIER_PREFIX) :], record["address"], int(record.get("active_sessions", 0))
                    )
                )
        return sorted(verifiers, key=lambda v: v.verifier_id)
