"""Run a `.pt2` from `pq_ao.export` with nothing but torch: load both programs, own the int KV cache, generate.

This module imports only torch and the standard library (and the tokenizer, for text), and the package's ops are
compiled into it (aten and Triton kernels), so a deployment needs neither pq_ao's quantization code nor the
quantized checkpoint.

Loading fix: AOTInductor's wrapper `.so` uses libstdc++ (`std::regex` among others) but does not always pull it in
itself; a Python whose process has no libstdc++ loaded yet (as on our GPU box, where torch links its own copy
privately) then crashes inside `std::regex` on load. `preload_libstdcxx()` loads the system libstdc++ with
RTLD_GLOBAL first, which is what `LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6)` did by hand; `load` calls it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import inspect
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import torch

_PRELOADED: list = []
TOKENIZER_DIR = "extra/pq_ao/tokenizer"  # as pq_ao.export writes it (kept literal: no pq_ao import here)


def _libstdcxx_candidates() -> list[str]:
    out = []
    gxx = shutil.which("g++") or shutil.which("c++")
    if gxx:
        try:
            path = subprocess.run([gxx, "-print-file-name=libstdc++.so.6"], capture_output=True, text=True,
                                  timeout=30).stdout.strip()  # fmt: skip
            if os.path.isabs(path):
                out.append(path)
        except (OSError, subprocess.SubprocessError):
            pass
    found = ctypes.util.find_library("stdc++")
    if found:
        out.append(found)
    out += ["/usr/lib/x86_64-linux-gnu/libstdc++.so.6", "/usr/lib64/libstdc++.so.6", "libstdc++.so.6"]
    return out


def preload_libstdcxx() -> str | None:
    """Load the system libstdc++ into the global symbol scope (once); returns the path loaded, or None when none
    could be (then loading may still work: most processes already have it)."""
    if _PRELOADED:
        return _PRELOADED[0]
    for path in _libstdcxx_candidates():
        try:
            ctypes.CDLL(path, mode=os.RTLD_GLOBAL | getattr(os, "RTLD_NOW", 0))
        except OSError:
            continue
        _PRELOADED.append(path)
        return path
    return None


def load_programs(path: str | Path) -> dict:
    """The AOTI programs of a `.pt2`, by name, with the archive's weights (`data/weights/`, written once for all
    programs) loaded once and handed to every program (or, in a package whose weights are inside each `.so`,
    those)."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    on_disk = any("/data/weights/" in n for n in names)
    try:
        from torch.export.pt2_archive._package import load_pt2
    except ImportError:
        load_pt2 = None
    if load_pt2 is not None and "load_weights_from_disk" in inspect.signature(load_pt2).parameters:
        return load_pt2(str(path), load_weights_from_disk=on_disk).aoti_runners
    if on_disk:
        raise RuntimeError(f"{path} keeps its weights in data/weights/, which this torch ({torch.__version__}) "
                           "cannot load: use the torch that exported it")  # fmt: skip
    from torch._inductor.package import load_package

    programs = {n.split("/")[3] for n in names if n.split("/")[1:3] == ["data", "aotinductor"]}
    return {name: load_package(str(path), model_name=name) for name in programs}


class Package:
    """The two programs of a pq_ao `.pt2`, their cache, and greedy generation.

    `Package(path).generate(ids)`: ids `[B, T]` (B = the exported batch size, no BOS: the prefix ends with it) ->
    `[B, T + new]`. The cache is allocated once (zeros) on `device` and reused; `reset()` empties it.
    """

    def __init__(self, path: str | Path, device: str | torch.device | None = None):
        preload_libstdcxx()
        self.path = Path(path)
        runners = load_programs(self.path)
        self.prefill, self.decode = runners["prefill"], runners["decode"]
        self.spec = json.loads(self.decode.get_metadata()["pq_ao"])
        self.device = torch.device(device or self.spec["device"])  # the device the programs were compiled for
        dtype = getattr(torch, self.spec["kv_dtype"])
        self.kv = [torch.zeros(self.spec["kv_shape"], dtype=dtype, device=self.device)
                   for _ in range(2 * self.spec["n_layers"])]  # fmt: skip
        self.length = torch.zeros(1, dtype=torch.long, device=self.device)

    def reset(self) -> None:
        self.length.zero_()

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed `ids` `[B, T]` (prefill for T > 1, decode for T = 1); last-position logits `[B, V]`."""
        b, t = ids.shape
        if b != self.spec["batch_size"]:
            raise ValueError(f"this package was exported for batch size {self.spec['batch_size']}, got {b}")
        if int(self.length) + t > self.spec["max_cache_len"]:
            raise ValueError(f"{int(self.length)} cached + {t} new tokens exceed the exported cache of "
                             f"{self.spec['max_cache_len']}")  # fmt: skip
        program = self.decode if t == 1 else self.prefill
        return program(ids.to(self.device), self.length, *self.kv)

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, eos_token_ids: list[int] = ()) -> torch.Tensor:
        """Greedy decoding from a fresh cache; stops early once every row has produced one of `eos_token_ids`."""
        self.reset()
        out = ids.to(self.device)
        logits = self.step(out)
        done = torch.zeros(out.shape[0], dtype=torch.bool, device=self.device)
        eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=self.device)
        for i in range(max_new_tokens):
            nxt = logits.argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], 1)
            done |= torch.isin(nxt[:, 0], eos)
            if i + 1 == max_new_tokens or bool(done.all()):
                break
            logits = self.step(nxt)
        return out

    def tokenizer(self):
        """The `tokenizers.Tokenizer` stored in the archive (None if it holds none)."""
        from tokenizers import Tokenizer

        with zipfile.ZipFile(self.path) as z:
            names = [n for n in z.namelist() if n.endswith(f"{TOKENIZER_DIR}/tokenizer.json")]
            return Tokenizer.from_str(z.read(names[0]).decode()) if names else None

    def generate_text(self, prompt: str, max_new_tokens: int = 32) -> str:
        """Prompt -> completion (batch 1 packages), tokenized without special tokens: the prefix ends with BOS."""
        tok = self.tokenizer()
        if tok is None:
            raise ValueError(f"{self.path} holds no tokenizer: pass token ids to generate()")
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=False).ids])
        if ids.shape[1] == 0:
            raise ValueError("the prompt is empty after tokenization")
        out = self.generate(ids, max_new_tokens, self.spec["eos_token_ids"])
        return tok.decode(out[0, ids.shape[1] :].tolist())


def load(path: str | Path, device=None) -> Package:
    """`Package(path, device)`."""
    return Package(path, device)
