"""Save and load quantized models: safetensors + JSON, no pickle.

A directory holds the HF `config.json` (as converted: untied embeddings; its `quantization_config` is the model's
`PrefixQuantState`: the PrefixQuant config, prefix ids, rotation seeds, source and report), the tokenizer,
`model.safetensors` (plain tensors; an `IntxLinearWeight` `<fqn>.weight` is stored as its inner tensors
`<fqn>.weight.qdata`, `.scale`, `.act_scale`, `.had_k`, `.act_clip`; the prefix KV and K/V scales are ordinary
buffers) and `pq_ao_config.json` (the format version, per module how to rebuild it, and the dtype of every
non-persistent float buffer, such as the rotary `inv_freq`, which the model rebuilds in its own dtype: a model cast
with `.to(bfloat16)` had it in bf16, and the load must give it back in bf16). Format 1 directories (the state in
`pq_ao_config.json`) still load.

Invariant: `load_quantized(save_quantized(m))` gives bit-identical logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pq_ao.kernels import enable_compile_memo
from pq_ao.nn.attention import KVQuantizer, PrefixAttention
from pq_ao.passes.prefix import attach_prefix_positions
from pq_ao.state import PrefixQuantState, require_state
from pq_ao.tensors import IntxLinearWeight

FORMAT = 2
READABLE_FORMATS = (1, 2)
CONFIG_FILE = "pq_ao_config.json"
WEIGHTS_FILE = "model.safetensors"
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}


def is_quantized_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def _kv_spec(q: KVQuantizer | None) -> dict | None:
    return None if q is None else {"bits": q.bits, "mode": q.mode, "clip": q.clip}


def save_quantized(model: nn.Module, path: str | Path, tokenizer=None) -> Path:
    """Write a quantized model (from `pq_ao.quantize_`) to directory `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    linears, attention, tensors = {}, {}, {}
    for name, mod in model.named_modules():
        if isinstance(mod, PrefixAttention):
            attention[name] = {
                "rotate_qk": mod.rotate_qk,
                "k_quant": _kv_spec(mod.k_quant),
                "v_quant": _kv_spec(mod.v_quant),
                "prefix_len": mod.prefix_len,
            }
        w = getattr(mod, "weight", None)
        if isinstance(w, IntxLinearWeight):
            linears[name] = {"w_bits": w.w_bits, "a_bits": w.a_bits, "act_mode": w.act_mode,
                             "shape": list(w.shape), "dtype": str(w.dtype).removeprefix("torch.")}  # fmt: skip
    for key, t in model.state_dict().items():
        if isinstance(t, IntxLinearWeight):
            for field in t.__tensor_flatten__()[0]:
                tensors[f"{key}.{field}"] = getattr(t, field).contiguous()
        else:
            tensors[key] = t.contiguous()
    if not linears:
        raise ValueError("the model has no IntxLinearWeight: quantize it with pq_ao.quantize_ first")
    state = require_state(model)
    persistent = set(model.state_dict())
    buffer_dtypes = {name: str(b.dtype).removeprefix("torch.") for name, b in model.named_buffers()
                     if name not in persistent and b.is_floating_point()}  # fmt: skip
    meta = {"format": FORMAT, "linears": linears, "attention": attention, "buffer_dtypes": buffer_dtypes}
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt", "pq_ao_format": str(FORMAT)})
    model.config.save_pretrained(path)  # with the state, as quantization_config
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
    tokenizer = tokenizer or state.tokenizer
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def _empty_model(config):
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: pay for a random init
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        return AutoModelForCausalLM.from_config(config)


def load_quantized(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild a model saved by `save_quantized`; returns `(model, tokenizer or None)`."""
    path = Path(path)
    if not is_quantized_dir(path):
        raise FileNotFoundError(f"{path} holds no {CONFIG_FILE}: not a pq_ao quantized model directory")
    meta = json.loads((path / CONFIG_FILE).read_text())
    if meta.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{path}: pq_ao format {meta.get('format')} is not supported (this pq_ao reads "
                         f"{READABLE_FORMATS})")
    tensors = load_file(str(path / WEIGHTS_FILE))
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(path)
    state = _saved_state(meta, getattr(hf_config, "quantization_config", None))
    hf_config.quantization_config = state
    model = _empty_model(hf_config)
    for name, spec in meta["attention"].items():
        attn = PrefixAttention.wrap(model.get_submodule(name), rotate_qk=spec["rotate_qk"])
        for kind in ("k_quant", "v_quant"):
            if spec[kind] is not None:
                s = spec[kind]
                setattr(attn, kind, KVQuantizer(s["bits"], attn.n_kv_heads, s["mode"], s["clip"]))
        if spec["prefix_len"]:
            attn.set_prefix(tensors[f"{name}.prefix_k"], tensors[f"{name}.prefix_v"])
        model.set_submodule(name, attn)
    for name, spec in meta["linears"].items():
        key = f"{name}.weight"
        fields = {f: tensors.pop(f"{key}.{f}") for f in ("qdata", "scale", "act_scale", "had_k", "act_clip")
                  if f"{key}.{f}" in tensors}  # fmt: skip
        weight = IntxLinearWeight(
            fields.pop("qdata"), fields.pop("scale"), spec["w_bits"], spec["a_bits"], spec["act_mode"],
            torch.Size(spec["shape"]), _DTYPES[spec["dtype"]], **fields,
        )  # fmt: skip
        model.get_submodule(name).weight = nn.Parameter(weight, requires_grad=False)
    result = model.load_state_dict(tensors, strict=False, assign=True)
    quantized = {f"{n}.weight" for n in meta["linears"]}
    missing = [k for k in result.missing_keys if k not in quantized]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path}: weights do not match the model (missing {missing}, unexpected {result.unexpected_keys})")
    if state.prefix_ids:
        attach_prefix_positions(model, state.prefix_ids)
    _restore_buffer_dtypes(model, meta.get("buffer_dtypes", {}))
    model = model.to(device).eval()
    enable_compile_memo()
    tokenizer = None
    if (path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        state.tokenizer = tokenizer
    return model, tokenizer


def _restore_buffer_dtypes(model: nn.Module, dtypes: dict[str, str]) -> None:
    """Non-persistent buffers come back in the dtype they had when saved (the constructor rebuilt them in its own:
    the same values before any cast, so casting them again gives the saved tensors bit for bit)."""
    for name, dtype in dtypes.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        buf = getattr(module, attr, None)
        if not isinstance(buf, torch.Tensor):
            raise ValueError(f"the saved model had a buffer {name} that this model does not build")
        module._buffers[attr] = buf.to(_DTYPES.get(dtype, buf.dtype))


def _saved_state(meta: dict, quantization_config) -> PrefixQuantState:
    """The state a directory records: `config.json`'s quantization_config (format 2), or the fields format 1 kept
    in `pq_ao_config.json`."""
    if meta["format"] >= 2:
        if not isinstance(quantization_config, dict):
            raise ValueError("config.json has no pq_ao quantization_config: the directory is incomplete")
        return PrefixQuantState.from_dict(quantization_config)
    return PrefixQuantState.from_dict({"quant_method": PrefixQuantState.QUANT_METHOD, "config": meta.get("pq_ao"),
                                       "prefix_ids": meta.get("prefix_ids"), "rotation": meta.get("rotation")})
