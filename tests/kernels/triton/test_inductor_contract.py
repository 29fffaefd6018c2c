"""What inductor needs from our Triton launches, checked without a GPU (both broke on the H200 only, under torch
2.11, when compiled or exported):

- every launch passes every kernel argument, defaulted ones too: otherwise inductor's mutation analysis fails
  ("Incorrect number of arguments passed to kernel"), treats every input as mutated and re-runs the analysis at
  each call site;
- each kernel's source with its transitive closure (what inductor pastes into a triple-quoted string in the
  generated module) holds no backslash, so it survives that quoting in any torch version;
- each launch compiles to TTIR for sm_90 when its Python-float arguments arrive as fp64 scalars, as inductor types
  them (eager Triton types them fp32): a float scalar that reaches a `tl.dot` uncast fails there.

The launchers run on CPU tensors here with `wrap_triton` replaced by a recorder: nothing is launched. Triton's
front end needs no GPU to build TTIR for a named target.
"""

from __future__ import annotations

import ast

import pytest
import torch
from pq_triton_launches import LAUNCH_OPTIONS, every_launch, record_launches
from pq_triton_offline import SM90
from triton.runtime.jit import JITFunction

from pq_ao.kernels.triton import attention, fp8_linear, gemm, hadamard, quant
from pq_ao.kernels.triton._common import interpreting

MODULES = (attention, fp8_linear, gemm, hadamard, quant)


@pytest.fixture
def launches(monkeypatch):
    return record_launches(monkeypatch)


def test_every_launch_passes_every_kernel_argument(launches):
    every_launch()
    kernels = {name for name, *_ in launches}
    assert {"_int_linear_kernel", "_int_gemv_kernel", "_hadamard_kernel", "_quantize_static_kernel",
            "_quantize_dynamic_kernel", "_kv_attention_kernel", "_combine_kernel",
            "_widen_int4_e4m3_kernel"} <= kernels, kernels  # fmt: skip
    for name, passed, expected, *_ in launches:
        assert len(passed) == len(set(passed)), f"{name}: an argument passed twice: {passed}"
        assert set(passed) == set(expected), f"{name}: missing {set(expected) - set(passed)}"


def _kernels():
    return sorted({(m.__name__, k) for m in MODULES for k, v in vars(m).items()
                   if isinstance(v, JITFunction) and k.endswith("_kernel")})  # fmt: skip


@pytest.mark.parametrize("module,name", _kernels())
def test_kernel_source_survives_inductor_quoting(module, name):
    from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code

    kernel = getattr(next(m for m in MODULES if m.__name__ == module), name)
    src = user_defined_triton_kernel_transitive_closure_source_code(kernel)
    assert "\\" not in src, f"{name}: a backslash in the kernel's closure source: {src[src.index(chr(92)) - 80 :][:160]}"
    assert "'''" not in src
    compile(ast.literal_eval("'''" + src + "'''"), name, "exec")  # quoted and unquoted as the generated module is


_TRITON_DTYPE = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                 torch.uint8: "u8", torch.int8: "i8", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1",
                 torch.float8_e4m3fn: "fp8e4nv"}  # fmt: skip


def _inductor_signature(kernel, values: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, options) of a launch as inductor compiles it: Python floats as fp64 scalars."""
    signature, constexprs = {}, {}
    for param in kernel.params:
        name, value = param.name, values[param.name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_DTYPE[value.dtype]
        elif value is None:
            signature[name], constexprs[name] = "constexpr", None
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp64"
        else:
            raise TypeError(f"{kernel.fn.__name__}: no Triton type for {name}={value!r}")
    options = {k: v for k, v in values.items() if k in LAUNCH_OPTIONS}
    return signature, constexprs, options


def _distinct_launches(launches) -> list:
    seen, out = set(), []
    for name, _, _, kernel, values in launches:
        signature, constexprs, options = _inductor_signature(kernel, values)
        key = (name, tuple(signature.items()), tuple(sorted(map(str, constexprs.items()))), tuple(options.items()))
        if key not in seen:
            seen.add(key)
            out.append((name, kernel, signature, constexprs, options))
    return out


@pytest.mark.skipif(interpreting(), reason="kernels decorated for the interpreter")
def test_every_launch_compiles_with_inductor_scalar_types(launches):
    from triton._C import libtriton
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    every_launch()
    target = SM90
    backend = make_backend(target)
    failures = []
    for name, kernel, signature, constexprs, options in _distinct_launches(launches):
        context = libtriton.ir.context()
        libtriton.ir.load_dialects(context)
        backend.load_dialects(context)
        opts = backend.parse_options(options)
        src = ASTSource(kernel, signature=signature, constexprs=constexprs)
        try:
            src.make_ir(target, opts, backend.get_codegen_implementation(opts), backend.get_module_map(), context)
        except Exception as e:  # noqa: BLE001 - reported below with the launch that failed
            fp64 = [k for k, v in signature.items() if v == "fp64"]
            failures.append(f"{name} (fp64 scalars {fp64}): {str(e).splitlines()[-1] if str(e) else type(e).__name__}")
    assert not failures, "\n".join(failures)
