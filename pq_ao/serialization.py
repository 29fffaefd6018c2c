"""Save and load quantized models: safetensors + JSON, no pickle.

A directory holds the HF `config.json` (as converted: untied embeddings; its `quantization_config` is the model's
`PrefixQuantState`: the PrefixQuant config, prefix ids, rotation seeds, source and report), the tokenizer,
`model.safetensors` (plain tensors; an `IntxLinearWeight` `<fqn>.weight` is stored as its inner tensors
`<fqn>.weight.qdata`, `.scale`, `.act_scale`, `.had_k`, `.act_clip`; the prefix KV and K/V scales are ordinary
buffers) and `pq_ao_config.json` (the format version, per module how to rebuild it, and the dtype of every
non-persistent float buffer, such as the rotary `inv_freq`, which the model rebuilds in its own dtype: a model cast
with `.to(bfloat16)` had it in bf16, and the load must give it back in bf16). Format 1 directories (the state in
`pq_ao_config.json`) still load.

Invariants: `load_quantized(save_quantized(m))` gives bit-identical logits; a directory verifies itself: the
recipe holds a SHA-256 of the weights file and of every entry that describes the model (each linear's and attention
module's spec, each field of the quantization state, the HF config), checked before anything is built, and the
fields are checked against the tensors they describe (code dtypes and shapes, scales present for the act mode,
prefix ids against the prefix KV, the layer count). A mismatch is a ValueError naming what differs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pq_ao.kernels import enable_compile_memo
from pq_ao.nn import masks
from pq_ao.nn.attention import KVQuantizer, PrefixAttention
from pq_ao.passes.fuse import fuse_projections, unfused
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
    """Write a quantized model (from `pq_ao.quantize_`) to directory `path`. Fused q/k/v and gate/up linears are
    written as the separate linears (`pq_ao.passes.unfused`), so a directory does not depend on the fusion."""
    with unfused(model):
        return _save(model, Path(path), tokenizer)


def _owned(t: torch.Tensor) -> torch.Tensor:
    """`t` contiguous and owning its storage (safetensors refuses tensors that share one, such as the views of a
    fused weight)."""
    t = t.contiguous()
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def _save(model: nn.Module, path: Path, tokenizer) -> Path:
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
                tensors[f"{key}.{field}"] = _owned(getattr(t, field))
        else:
            tensors[key] = _owned(t)
    if not linears:
        raise ValueError("the model has no IntxLinearWeight: quantize it with pq_ao.quantize_ first")
    state = require_state(model)
    persistent = set(model.state_dict())
    buffer_dtypes = {name: str(b.dtype).removeprefix("torch.") for name, b in model.named_buffers()
                     if name not in persistent and b.is_floating_point()}  # fmt: skip
    meta = {"format": FORMAT, "linears": linears, "attention": attention, "buffer_dtypes": buffer_dtypes}
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt", "pq_ao_format": str(FORMAT)})
    model.config.save_pretrained(path)  # with the state, as quantization_config
    meta["digests"] = _digests(path, meta)
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


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _hf_config_fields(path: Path) -> dict:
    """config.json without the state (digested field by field) and the writer's transformers version."""
    config = json.loads((path / "config.json").read_text())
    return {k: v for k, v in config.items() if k not in ("quantization_config", "transformers_version")}


def _digests(path: Path, meta: dict) -> dict[str, str]:
    """SHA-256 per described entry: the weights file, each linear / attention spec, the buffer dtypes, each field
    of the quantization state and the HF config."""
    out = {WEIGHTS_FILE: _sha256_file(path / WEIGHTS_FILE), "buffer_dtypes": _sha256_json(meta["buffer_dtypes"]),
           "config.json": _sha256_json(_hf_config_fields(path))}  # fmt: skip
    for section in ("linears", "attention"):
        out.update({f"{section}[{name!r}]": _sha256_json(spec) for name, spec in meta[section].items()})
    state = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    out.update({f"quantization_config[{key!r}]": _sha256_json(v) for key, v in state.items()})
    return out


def verify_dir(path: str | Path) -> None:
    """Check a saved directory against the digests it recorded (ValueError naming the first entry that differs).
    Format 1 directories recorded none and are not checked."""
    path = Path(path)
    meta = json.loads((path / CONFIG_FILE).read_text())
    want = meta.get("digests")
    if want is None:
        return
    got = _digests(path, meta)
    for key in sorted(set(want) | set(got)):
        if want.get(key) != got.get(key):
            what = ("was added" if key not in want else "is missing") if want.get(key) is None or got.get(key) is None \
                else "changed since it was saved"  # fmt: skip
            raise ValueError(f"{path}: {key} {what} (its SHA-256 does not match the one recorded in {CONFIG_FILE}): "
                             "the checkpoint is corrupted or was edited; save the model again")


def _check_against_tensors(path: Path, meta: dict, state: PrefixQuantState, tensors: dict, hf_config) -> None:
    """The fields agree with the tensors they describe (what a digest cannot say when the directory was written by
    hand): code dtypes and shapes, the scales an act mode needs, the prefix KV length, the layer count."""
    layers = {int(name.split(".")[2]) for name in meta["linears"] if name.startswith("model.layers.")}
    n = getattr(hf_config, "num_hidden_layers", None)
    if layers and n is not None and n != max(layers) + 1:
        raise ValueError(f"{path}: config.json says num_hidden_layers={n}, the checkpoint holds {max(layers) + 1} "
                         "quantized layers")  # fmt: skip
    for name, spec in meta["attention"].items():
        p = spec["prefix_len"]
        if p != len(state.prefix_ids):
            raise ValueError(f"{path}: attention[{name!r}].prefix_len={p}, but the state's prefix_ids has "
                             f"{len(state.prefix_ids)} tokens")  # fmt: skip
        k = tensors.get(f"{name}.prefix_k")
        if p and (k is None or k.shape[2] != p):
            raise ValueError(f"{path}: attention[{name!r}].prefix_len={p}, the saved prefix_k is "
                             f"{None if k is None else list(k.shape)}")  # fmt: skip
    for name, spec in meta["linears"].items():
        key = f"{name}.weight"
        q = tensors.get(f"{key}.qdata")
        if q is None:
            raise ValueError(f"{path}: linears[{name!r}] has no {key}.qdata in {WEIGHTS_FILE}")
        want = (torch.uint8, spec["shape"][1] // 2) if spec["w_bits"] == 4 else (torch.int8, spec["shape"][1])
        if q.dtype != want[0] or q.shape[-1] != want[1]:
            raise ValueError(f"{path}: linears[{name!r}].w_bits={spec['w_bits']} does not fit its codes "
                             f"({q.dtype} {list(q.shape)})")  # fmt: skip
        if (f"{key}.act_scale" in tensors) != (spec["act_mode"] == "static"):
            raise ValueError(f"{path}: linears[{name!r}].act_mode={spec['act_mode']!r} does not fit its tensors "
                             "(a static act scale is present exactly for act_mode 'static')")


def load_quantized(path: str | Path, device: str | torch.device = "cpu", verify: bool = True):
    """Rebuild a model saved by `save_quantized`; returns `(model, tokenizer or None)`. `verify` (default) checks
    the directory against its digests first (`verify_dir`; a few seconds per GB of weights)."""
    path = Path(path)
    if not is_quantized_dir(path):
        raise FileNotFoundError(f"{path} holds no {CONFIG_FILE}: not a pq_ao quantized model directory")
    meta = json.loads((path / CONFIG_FILE).read_text())
    if meta.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{path}: pq_ao format {meta.get('format')} is not supported (this pq_ao reads "
                         f"{READABLE_FORMATS})")
    if verify:
        verify_dir(path)
    tensors = load_file(str(path / WEIGHTS_FILE))
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(path)
    state = _saved_state(meta, getattr(hf_config, "quantization_config", None))
    _check_against_tensors(path, meta, state, tensors, hf_config)
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
    masks.use_prefix_masks(model)
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
    if state.config.fuse_projections:
        fuse_projections(model)
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
