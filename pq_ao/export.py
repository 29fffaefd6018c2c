"""torch.export + AOTInductor for a quantized model: one `.pt2` holding a prefill and a decode program.

Both programs take the int KV cache explicitly and write it in place (`pq_ao.runtime` owns it between calls):

    prefill(input_ids [B, T], length, *kv) -> logits [B, V]    T in [2, max_cache_len] (a dynamic dim)
    decode (input_ids [B, 1], length, *kv) -> logits [B, V]

`kv = k_0, v_0, k_1, v_1, ...` are the layers' code buffers (`QuantizedKVCache`: `[B, H_kv, S, D // 2]` uint8
for 4-bit, `[B, H_kv, S, D]` int8 for 8-bit), `length` (int64 `[1]`) the number of tokens they hold; a call writes
slots `length .. length + T - 1` and adds T to `length`. Logits are those of the last position. The prefix KV,
rotations, scales and weights are constants of the programs; the batch size and `S` are fixed at export.

The package's metadata (`get_metadata()["pq_ao"]`, JSON) describes the cache and the tokens, and the archive
carries the tokenizer (`extra/pq_ao/tokenizer/`), so that `pq_ao.runtime` needs nothing but the `.pt2`.

The weights are stored once in the archive (`data/weights/`, shared by both programs: torch's packager
deduplicates tensors that share storage) rather than compiled into each program's `.so`, which halves the package
and spares the C++ build a constant blob of the model's size. Such a package loads through `pq_ao.runtime.load`
(or torch's `load_pt2(path, load_weights_from_disk=True)`, which hands both programs the same weight tensors);
a bare `load_package` would run its program without weights.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import zipfile
from pathlib import Path

import torch
from torch import nn

from pq_ao.hf_compat import cache_kwarg
from pq_ao.kernels import enable_compile_memo
from pq_ao.nn.kv_cache import QuantizedKVCache
from pq_ao.numerics import DEFAULT as DEFAULT_NUMERICS
from pq_ao.numerics import compiling
from pq_ao.state import state_of

PROGRAMS = ("prefill", "decode")
# weights into data/weights/ of the archive, once, instead of into each program's .so (where torch has the option)
WEIGHTS_ON_DISK = {"aot_inductor.package_constants_in_so": False,
                   "aot_inductor.package_constants_on_disk_format": "pickle_weights"}  # fmt: skip
log = logging.getLogger(__name__)
FORMAT = 1


class CacheProgram(nn.Module):
    """`model` as a function of (input_ids, length, *kv) -> last-position logits, writing the cache in place."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._cache_kwarg = cache_kwarg(model)

    def forward(self, input_ids: torch.Tensor, length: torch.Tensor, *kv: torch.Tensor) -> torch.Tensor:
        cache = QuantizedKVCache.over(self.model, list(kv), length)
        out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{self._cache_kwarg: cache})
        length.add_(input_ids.shape[1])
        return out.logits[:, -1]


def cache_spec(model: nn.Module, batch_size: int, max_cache_len: int) -> dict:
    """What the runtime needs to allocate the cache and drive the programs (JSON-safe)."""
    cache = QuantizedKVCache(model, max_cache_len)
    codes = cache.empty_codes(batch_size, max_cache_len, "meta")
    config = model.config
    state = state_of(model)
    return {
        "format": FORMAT,
        "batch_size": batch_size,
        "max_cache_len": max_cache_len,
        "n_layers": len(cache.layers),
        "kv_shape": list(codes.shape),
        "kv_dtype": str(codes.dtype).removeprefix("torch."),
        "kv_bits": cache.bits,
        "vocab_size": config.vocab_size,
        "prefix_ids": list(state.prefix_ids) if state else [],
        "eos_token_ids": _as_list(getattr(model.generation_config, "eos_token_id", None) or config.eos_token_id),
        "pq_ao": state.config.name if state and state.config else None,
        "device": next(model.parameters()).device.type,
    }


def _as_list(value) -> list[int]:
    return [] if value is None else [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def example_inputs(spec: dict, seqlen: int, device) -> tuple:
    dtype = getattr(torch, spec["kv_dtype"])
    kv = [torch.zeros(spec["kv_shape"], dtype=dtype, device=device) for _ in range(2 * spec["n_layers"])]
    ids = torch.ones(spec["batch_size"], seqlen, dtype=torch.long, device=device)
    return (ids, torch.zeros(1, dtype=torch.long, device=device), *kv)


@torch.no_grad()
def export_programs(model: nn.Module, batch_size: int = 1, max_cache_len: int = 2048,
                    programs: tuple[str, ...] = PROGRAMS, program: nn.Module | None = None):
    """(spec, {"prefill": ExportedProgram, "decode": ExportedProgram}) of a quantized model (static int KV), or
    of the named `programs` only. `program`: the module exported (default `CacheProgram(model)`); another must
    take the same inputs (a debugging variant may return more)."""
    if max_cache_len < 2:
        raise ValueError(f"max_cache_len must be >= 2, got {max_cache_len}")
    unknown = set(programs) - set(PROGRAMS)
    if unknown or not programs:
        raise ValueError(f"programs must be a non-empty subset of {PROGRAMS}, got {programs}")
    model.eval()
    enable_compile_memo()
    spec = cache_spec(model, batch_size, max_cache_len)
    device = next(model.parameters()).device
    program = program if program is not None else CacheProgram(model)
    seq = torch.export.Dim("seqlen", min=2, max=max_cache_len)
    n_kv = 2 * spec["n_layers"]
    eps = {}
    if "prefill" in programs:
        eps["prefill"] = torch.export.export(program, example_inputs(spec, 2, device),
                                             dynamic_shapes=({1: seq}, None, (None,) * n_kv), strict=False)
    if "decode" in programs:
        eps["decode"] = torch.export.export(program, example_inputs(spec, 1, device), strict=False)
    return spec, eps


def compile_package(
    model: nn.Module,
    path: str | Path,
    batch_size: int = 1,
    max_cache_len: int = 2048,
    tokenizer=None,
    weights_in_so: bool = False,
    numerics: str = DEFAULT_NUMERICS,
) -> Path:
    """Export both programs and AOT-compile them into the `.pt2` at `path` (see the module docstring); the
    tokenizer (default: the model's, from `pq_ao.load_model` / `load_quantized`) goes into the archive too.
    `weights_in_so`: compile the weights into each program's `.so` instead (torch's default layout).
    `numerics`: "eager" (default) compiles with eager's rounding (`pq_ao.numerics`), so that the greedy text is
    eager's; "inductor" with inductor's own (fewer launches, another rounding, so another text)."""
    from torch._inductor.package import package_aoti

    t = time.perf_counter()
    spec, eps = export_programs(model, batch_size, max_cache_len)
    log.info("exported %s in %.1f s", " and ".join(eps), time.perf_counter() - t)
    files = {name: aot_compile_program(ep, name, spec, weights_in_so, numerics=numerics) for name, ep in eps.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    package_aoti(str(path), files)
    tokenizer = tokenizer or getattr(state_of(model), "tokenizer", None)
    if tokenizer is not None:
        _add_tokenizer(path, tokenizer)
    return path


def aot_compile_program(ep, name: str, spec: dict, weights_in_so: bool = False, options: dict | None = None,
                        numerics: str = DEFAULT_NUMERICS) -> list[str]:
    """AOT-compile one exported program (`export_programs`) into package files, `package_aoti`'s input, with the
    spec, the program's name and the numerics as its metadata; `options`: more inductor settings."""
    t = time.perf_counter()
    enable_compile_memo()
    # (no "aot_inductor.model_name_for_generated_files": with it the CPU programs computed wrong logits,
    # 9-12% off, on torch 2.13; package_aoti keeps the two programs' files apart by model name anyway)
    meta = {"pq_ao": json.dumps(spec), "program": name, "numerics": numerics}
    weights = {} if weights_in_so else _weights_on_disk()
    options = {"aot_inductor.package": True, "aot_inductor.metadata": meta, **weights, **(options or {})}
    args, kwargs = ep.example_inputs
    with compiling(numerics):
        files = torch._inductor.aot_compile(_unguarded_module(ep), args, kwargs, options=options)
    log.info("AOT-compiled %s in %.1f s", name, time.perf_counter() - t)
    return files


TOKENIZER_DIR = "extra/pq_ao/tokenizer"  # inside the archive's root folder


def _add_tokenizer(path: Path, tokenizer) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        with zipfile.ZipFile(path, "a") as z:
            root = z.namelist()[0].split("/")[0]
            for f in sorted(Path(tmp).iterdir()):
                z.write(f, f"{root}/{TOKENIZER_DIR}/{f.name}")


def _weights_on_disk() -> dict:
    has = hasattr(torch._inductor.config.aot_inductor, "package_constants_on_disk_format")
    return WEIGHTS_ON_DISK if has else {}


def _unguarded_module(ep) -> torch.fx.GraphModule:
    """`ep.module()` as `aoti_compile_and_package` takes it (input guards are checked by the package itself)."""
    try:
        return ep.module(check_guards=False)
    except TypeError:  # torch < 2.12 has no check_guards
        return ep.module()
