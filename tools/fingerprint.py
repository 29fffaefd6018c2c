"""Bitwise before/after check of a refactor: quantize a model with a fixed config on the CPU and save its logits on
fixed token ids; run it on two checkouts and compare the files.

    PYTHONPATH=<old checkout> python3 tools/fingerprint.py stories260k /tmp/before.pt
    PYTHONPATH=.              python3 tools/fingerprint.py stories260k /tmp/after.pt --compare /tmp/before.pt

Behaviour-preserving changes (issue 17) must give bitwise-equal logits on the same machine. Across machines the
fp32 GEMMs of calibration round differently, so the files are only comparable on one machine.
"""

from __future__ import annotations

import argparse
import sys

import torch

import pq_ao

SETTINGS = {"stories260k": dict(n_samples=8, seqlen=256, grid_samples=2, grid_seqlen=256),
            "smollm2-135m": dict(n_samples=16, seqlen=512, grid_samples=1, grid_seqlen=512)}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", choices=sorted(SETTINGS))
    p.add_argument("out")
    p.add_argument("--compare", help="a file written by an earlier run: exit 1 unless bitwise equal")
    args = p.parse_args()
    torch.manual_seed(0)
    model, tok = pq_ao.load_model(args.model, dtype=torch.float32)
    pq_ao.quantize_(model, pq_ao.prefixquant_w4a4(**SETTINGS[args.model]))
    ids = torch.randint(3, min(tok.vocab_size, 4000), (2, 96), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    torch.save(logits, args.out)
    print(args.model, tuple(logits.shape), float(logits.double().sum()))
    if args.compare:
        other = torch.load(args.compare)
        equal = torch.equal(other, logits)
        print("bitwise equal" if equal else f"DIFFERENT: max |diff| {float((other - logits).abs().max()):.3g}")
        return 0 if equal else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
