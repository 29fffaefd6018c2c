"""GPU regression check: a static W4A4 linear (with and without the online Hadamard) under torch.compile equals
eager. (Found on the H200, 2026-12-01: inductor passes the Hadamard kernel's Python-float `inv_sqrt_n` as fp64,
which made the fused Hadamard+quantize kernel fail to compile; fixed in kernels/triton/hadamard.py.)

    python3 benchmarks/gpu/check_compile_linear.py
"""

import torch

import pq_ao  # noqa: F401  (registers the ops)
from pq_ao.hadamard import hadamard_factor
from pq_ao.tensors import IntxLinearWeight


def main() -> None:
    w = torch.randn(1536, 576, device="cuda")
    x = torch.randn(4, 33, 576, device="cuda")
    for name, had in (("static + Hadamard", hadamard_factor(576)[1]), ("static", None)):
        lin = torch.nn.Linear(576, 1536, bias=False, device="cuda")
        weight = IntxLinearWeight.from_float(w, 4, 4, "static", act_scale=0.05, had_k=had)
        lin.weight = torch.nn.Parameter(weight, requires_grad=False)
        with torch.no_grad():
            err = (torch.compile(lin, fullgraph=True)(x) - lin(x)).abs().max().item()
        print(f"{name}: compiled vs eager max |diff| = {err}")
        assert err == 0.0


if __name__ == "__main__":
    main()
