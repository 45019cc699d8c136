"""The loader's record of where a converted model came from (the llama.cpp peer decodes that GGUF)."""

from __future__ import annotations

from specray.workers.models.loader import gguf_source


def test_a_converted_gguf_names_its_source(smollm2):
    source = gguf_source(smollm2.path)
    assert source is not None and source.suffix == ".gguf", f"no GGUF recorded for {smollm2.path}"
    assert source.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_an_ordinary_checkpoint_has_no_gguf_source(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert gguf_source(tmp_path) is None
