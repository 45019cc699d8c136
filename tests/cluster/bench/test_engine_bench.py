"""`specray bench engine` at toy size (a tiny random model): the batch-1 table (each speculative
mode under fixed and confidence scheduling) and the batched throughput mode run in one call and
report every mode at every batch size, in JSON and a PNG."""

from __future__ import annotations

import json

import pytest
from tiny_models import tiny_hf_model

from specray.cluster.bench.engine_bench import mode_name
from specray.cluster.bench.engine_throughput import _until_stop
from specray.cluster.commands.cli import main

BATCH_SIZES = (1, 3, 7)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama_bench")
    tiny_hf_model("llama", path, vocab_size=96, seed=1)
    return path


def test_batch_one_and_throughput_in_one_run(tiny_model, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    # Five prompts for batches of up to seven: the bench cycles them. Repeats give n-gram matches.
    lines = [" ".join(f"w{3 + (i * j) % 9}" for j in range(4 + 3 * i)) for i in range(5)]
    prompts.write_text("".join(json.dumps({"prompt": line}) + "\n" for line in lines))
    out = tmp_path / "bench.json"
    args = ["bench", "engine", "--model", str(tiny_model), "--prompts", str(prompts), "--json", str(out)]
    args += ["--num-prompts", "2", "--max-tokens", "6", "--drafter", "ngram", "--batch-drafter", "ngram"]
    args += ["--dtype", "float32", "--scheduling", "fixed", "--scheduling", "confidence", "--rounds", "2"]
    args += ["--no-llama-cpp", *(a for b in BATCH_SIZES for a in ("--batch-size", str(b)))]
    assert main(args) == 0

    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["dtypes"] == ["float32"]
    assert [m["name"] for m in report["modes"]] == [
        "autoregressive",
        "ngram",
        "ngram/confidence",
        "hf_generate",
        "hf_prompt_lookup",
    ]
    assert all(len(m["tokens_per_s_by_round"]) == 2 for m in report["modes"]), "a round was not timed"
    speculative = [m for m in report["modes"] if m["name"].startswith("ngram")]
    assert all(m["matches_autoregressive"] for m in speculative), "a scheduling changed the greedy text"
    rows = {(r["name"], r["batch_size"]): r for r in report["throughput"]}
    assert set(rows) == {(m, b) for m in ("autoregressive", "ngram", "hf_generate") for b in BATCH_SIZES}
    for (name, batch), row in rows.items():
        assert row["tokens_per_s"] > 0 and row["responses_per_s"] > 0, (name, batch)
        assert (row["tau"] is not None) == (name == "ngram"), (name, batch)
    # Lossless at every batch size: speculative responses equal autoregressive ones.
    assert all(rows[("ngram", b)]["matching_responses"] == b for b in BATCH_SIZES)
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mode_names_tell_a_hybrid_from_its_block_drafter():
    """A checkpoint path is labelled by its directory; the hybrid over it keeps `hybrid:`, so the
    two modes' outputs are never pooled under one name."""
    assert mode_name("ngram") == "ngram"
    assert mode_name("ckpts/run/dspark") == "dspark"
    assert mode_name("hybrid:ckpts/run/dspark") == "hybrid:dspark"
    assert mode_name("hybrid:smollm2-135m-dspark") == "hybrid:smollm2-135m-dspark"


def test_a_padded_hf_row_ends_at_its_first_stop_token():
    assert _until_stop([5, 2, 0, 0], {2}) == [5, 2]
    assert _until_stop([5, 6, 7], {2}) == [5, 6, 7], "a row that never stopped keeps every token"


def test_only_throughput_needs_a_batch_size(tmp_path, capsys):
    assert main(["bench", "engine", "--only-throughput", "--json", str(tmp_path / "x.json")]) == 2
    assert "--batch-size" in capsys.readouterr().err
