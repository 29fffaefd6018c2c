"""End-to-end speed of a Llama-3-8B-shaped model on the GPU: bf16 vs PrefixQuant static W4A4KV4 vs QuaRot-style
dynamic W4A4KV4 vs torchao's fp8-row (the prefill peer) and int4 weight-only (the decode peer), all through the same
`torch.compile` settings.

The model has the real shapes (hidden 4096, MLP 14336, 32 layers, 32 query / 8 KV heads, vocab 128256) and HF's
random initialisation in bf16 (speed does not depend on the values; nothing is timed on zeros). The quantized
models go through the real pipeline (`pq_ao.quantize_`, calibrated on random token ids).

Measured per model: prefill latency (batch 1, 2048 tokens, writing a fresh cache), decode tokens/s at batch 1 and
16 with 2048 tokens of context (the cache pre-filled with random contents), peak GPU memory, the KV-cache bytes,
and with `--profile` a profiler table of one call per stage. Prefill runs `torch.compile(model, fullgraph=True,
dynamic=False)`; decode adds `mode="reduce-overhead"` (CUDA graphs); each shape gets its own static graph. bf16 uses HF's StaticCache, the quantized
models pq_ao's `QuantizedKVCache` (static int4) or, for the dynamic model, HF's StaticCache of fake-quantized
values (per-token KV scales have no int cache here yet).

    python3 benchmarks/bench_e2e.py --json $OUT/e2e.json --budget-s 540

Stages run in order while the budget lasts; the JSON is rewritten after each stage, and a run given an existing
JSON skips the stages it already holds (one model per device call, if need be). The quantized models' compiles
take minutes, so the models can run as processes side by side, sharing a lock that keeps their calibration and
timed sections apart (their compiles overlap on the host):

    for m in static bf16 dynamic; do
        python3 benchmarks/bench_e2e.py --models $m --json $OUT/e2e_$m.json --lock /tmp/gpu.lock --profile &
    done; wait
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import fcntl
import json
import time
from pathlib import Path

import torch

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0,
                 max_position_embeddings=8192, rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001,
                 tie_word_embeddings=False)  # fmt: skip
TINY = dict(LLAMA3_8B, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
            head_dim=64, vocab_size=1000, bos_token_id=1, eos_token_id=2)  # --tiny: a CPU smoke test of this script
CONTEXT, PREFILL, DECODE_STEPS = 2048, 2048, 32
DEVICE = "cuda"
# --lock: timed sections and calibration hold it, so processes compiling side by side time one at a time
LOCK: Path | None = None


def build_model(layers: int, shapes: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**shapes, "num_hidden_layers": layers})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.eval()


def sdpa_gqa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """HF attention through SDPA with `enable_gqa=True` whatever the mask: no KV-head expansion copies (HF's own
    "sdpa" repeats the KV heads whenever a mask is passed, as it is with a static cache). Registered as
    "sdpa_gqa" for the fair bf16 baseline (`--models bf16_gqa`)."""
    import torch.nn.functional as F

    mask = attention_mask
    if mask is not None and mask.dim() == 4:
        mask = mask[:, :, :, : key.shape[-2]]
    if is_causal is None:
        is_causal = query.shape[2] > 1 and mask is None and getattr(module, "is_causal", True)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, scale=scaling,
                                         is_causal=is_causal, enable_gqa=True)  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


def gqa_aware(base):
    """The bf16 model with GQA-aware SDPA (the same weights, the same compile settings)."""
    from transformers import AttentionInterface

    AttentionInterface.register("sdpa_gqa", sdpa_gqa)
    base.config._attn_implementation = "sdpa_gqa"
    return base, {}


def _torchao_peer(base, config):
    """`config` (a torchao config) on every decoder linear of a copy of `base` (lm_head stays bf16, as in the other
    models), with the GQA-aware attention of the fair bf16 baseline: the peers differ from it in their linears only."""
    from torchao.quantization import quantize_

    model = copy.deepcopy(base)
    t = time.perf_counter()
    quantize_(model.model.layers, config)
    sync()
    gqa_aware(model)
    return model, {"quantize_s": time.perf_counter() - t, "attention": "SDPA enable_gqa=True"}


def torchao_fp8row(base):
    """The prefill peer a Hopper user picks today: torchao's Float8DynamicActivationFloat8WeightConfig(PerRow)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    return _torchao_peer(base, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))


def torchao_int4wo(base):
    """The decode peer: torchao's int4 weight-only, group 128, on tinygemm (`aten._weight_int4pack_mm`, in torch's
    CUDA build: no extra wheel), the packing torchao documents for CUDA batch-1 speed."""
    from torchao.quantization import Int4WeightOnlyConfig
    from torchao.quantization.quant_api import Int4PackingFormat

    return _torchao_peer(base, Int4WeightOnlyConfig(group_size=128,
                                                    int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D))


def quantized(base, kind: str, calib_samples: int):
    import pq_ao

    model = copy.deepcopy(base)
    ids = torch.randint(10, base.config.vocab_size, (calib_samples, 512), generator=torch.Generator().manual_seed(1))
    common = dict(calibration=ids, n_samples=calib_samples, grid_samples=1, grid_seqlen=512)
    config = pq_ao.prefixquant_w4a4(**common) if kind == "static" else pq_ao.quarot_w4a4(**common)
    with gpu_to_myself():  # calibration is GPU-heavy: it must not overlap another process's timing
        t = time.perf_counter()
        report = pq_ao.quantize_(model, config)
        sync()
    return model, {"quantize_s": time.perf_counter() - t, "phases_s": report.seconds,
                   "prefix": report.prefix.prefix_ids if report.prefix else None}  # fmt: skip


def make_cache(model, kind: str, batch: int, max_len: int, fill: int):
    """A cache for `batch` sequences whose first `fill` slots hold random contents."""
    from transformers import StaticCache

    from pq_ao.nn.kv_cache import QuantizedKVCache

    if kind == "static":
        cache = QuantizedKVCache(model, max_cache_len=max_len, batch_size=batch)
        for layer in cache.layers:
            for t in (layer.keys, layer.values):
                t.copy_(torch.randint(0, 256, t.shape, device=t.device).to(t.dtype))
    else:
        cfg = model.config
        cache = StaticCache(config=cfg, max_cache_len=max_len)
        cache.early_initialization(batch, cfg.num_key_value_heads, cfg.head_dim, torch.bfloat16, DEVICE)
        for layer in cache.layers:
            layer.keys.normal_()
            layer.values.normal_()
    for layer in cache.layers:
        layer.cumulative_length.fill_(fill)
        if kind == "static":
            layer.holds_tokens = fill > 0  # the host mirror of the length (QuantizedKVLayer)
    return cache


def model_bytes(model) -> int:
    """Bytes of parameters and buffers, counting a tensor subclass by its inner tensors (packed int4 + scales)."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        inner = t.__tensor_flatten__()[0] if hasattr(t, "__tensor_flatten__") else None
        parts = [getattr(t, n) for n in inner] if inner else [t]
        total += sum(x.numel() * x.element_size() for x in parts)
    return total


def cache_kw(model) -> str:
    from pq_ao.hf_compat import cache_kwarg

    return cache_kwarg(model)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def gpu_to_myself():
    """Hold the --lock file (if any) exclusively: no other benchmark process uses the GPU heavily meanwhile (their
    compiles, on the host, go on)."""
    if LOCK is None:
        yield
        return
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def time_cuda(fn, iters: int) -> float:
    """Median of `iters` timed calls, ms (CUDA events around each; a host clock on the CPU)."""
    times = []
    for _ in range(iters):
        if DEVICE != "cuda":
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
            continue
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def _mem() -> tuple:
    if DEVICE != "cuda":
        return 0
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _peak(before) -> float:
    return (torch.cuda.max_memory_allocated() - before) / 2**30 if DEVICE == "cuda" else 0.0


def memory_report(blocks: int = 8) -> dict:
    """GiB allocated / reserved / peak, and the largest live allocations (GiB) with how many of each size."""
    if DEVICE != "cuda":
        return {}
    sizes: dict[int, int] = {}
    for seg in torch.cuda.memory_snapshot():
        for b in seg["blocks"]:
            if b["state"] == "active_allocated":
                sizes[b["size"]] = sizes.get(b["size"], 0) + 1
    top = sorted(sizes.items(), key=lambda kv: -kv[0] * kv[1])[:blocks]
    return {"allocated_gib": torch.cuda.memory_allocated() / 2**30, "reserved_gib": torch.cuda.memory_reserved() / 2**30,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "largest": [{"gib": size / 2**30, "count": n} for size, n in top]}  # fmt: skip


def memo_counts() -> dict:
    """The mutation-analysis memo's counts so far (cumulative over the process's compiles)."""
    try:
        from pq_ao.kernels.triton import mutation_memo
    except ImportError:  # no triton
        return {}
    return mutation_memo.counts()


def profile_table(fn, rows: int = 20) -> str:
    """Kernel-time table of one call of `fn` (already compiled and warm); on CUDA followed by the host's CUDA API
    calls (launch counts and time, and any synchronization or copy that stalls the host)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = DEVICE == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        fn()
        sync()
    events = prof.key_averages()
    table = events.table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=rows,
                         max_name_column_width=110)  # inductor names list what a kernel fused
    if not cuda:
        return table
    api = [e for e in events if e.key.startswith(("cuda", "cu")) and e.count]
    lines = [f"{e.key}: {e.count} calls, {e.cpu_time_total / 1e3:.2f} ms host" for e in
             sorted(api, key=lambda e: -e.cpu_time_total)[:8]]
    return table + "\nCUDA API (host):\n" + "\n".join(lines)


def check_prefill_paths(model, compiled, ids, kw) -> dict:
    """What the timed prefill computes, checked on the same ids: the last position's logits of the compiled
    fresh-cache prefill (causal SDPA over its own codes) against the compiled masked path (every slot, the cache's
    `holds_tokens` forced) and against eager; relative differences and whether the argmax agrees. (A random static
    W4A4 model is chaotic in bf16: read these against each other, not against fp32 tolerances.)"""

    def logits(fn, holds: bool) -> torch.Tensor:
        cache = make_cache(model, "static", 1, PREFILL + 16, 0)
        for layer in cache.layers:
            layer.holds_tokens = holds
        return fn(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache}).logits.float()

    fresh, masked, eager = logits(compiled, False), logits(compiled, True), logits(model, False)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    return {"fresh_vs_masked": rel(fresh, masked), "fresh_vs_eager": rel(fresh, eager),
            "masked_vs_eager": rel(masked, eager),
            "argmax_fresh_masked_eager": [int(t.argmax()) for t in (fresh, masked, eager)]}  # fmt: skip


@torch.inference_mode()  # without it autograd recorded every call and chained them through the cache (12-07)
def bench_prefill(model, kind: str, profile: bool = False, check: bool = False) -> dict:
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    ids = torch.randint(10, model.config.vocab_size, (1, PREFILL), device=DEVICE)
    kw = cache_kw(model)
    cache = make_cache(model, kind, 1, PREFILL + 16, 0)

    def run():
        return compiled(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache})

    def empty_cache():
        cache.reset()

    t = time.perf_counter()
    run()
    sync()
    compile_s = time.perf_counter() - t
    first_call = memory_report(blocks=4)  # an 80 GB H100 ran out of memory in the bf16 rows' timed calls (12-07)
    with gpu_to_myself():
        before = _mem()
        times = []
        for _ in range(10):
            empty_cache()
            times.append(time_cuda(run, 1))
        ms = sorted(times)[len(times) // 2]
        row = {"prefill_ms": ms, "prefill_ms_runs": times, "prefill_tok_s": PREFILL / ms * 1e3, "compile_s": compile_s,
               "activation_peak_gib": _peak(before), "mutation_analyses": memo_counts(),
               "memory_after_first_call": first_call}  # fmt: skip
        if profile:
            empty_cache()
            row["profile"] = profile_table(run)
    if check and kind == "static":
        row["check"] = check_prefill_paths(model, compiled, ids, kw)
        print("prefill paths:", row["check"], flush=True)
    return row


@torch.inference_mode()
def bench_decode(model, kind: str, batch: int, profile: bool = False) -> dict:
    mode = "reduce-overhead" if DEVICE == "cuda" else None  # CUDA graphs
    compiled = torch.compile(model, fullgraph=True, dynamic=False, mode=mode)
    cache = make_cache(model, kind, batch, CONTEXT + DECODE_STEPS + 8, CONTEXT)
    kw = cache_kw(model)
    ids = torch.randint(10, model.config.vocab_size, (batch, 1), device=DEVICE)

    def step():
        return compiled(input_ids=ids, use_cache=True, **{kw: cache})

    def steps():
        for _ in range(DECODE_STEPS):
            step()

    t = time.perf_counter()
    for _ in range(3):
        step()
    sync()
    compile_s = time.perf_counter() - t
    with gpu_to_myself():
        before = _mem()
        times = []
        for _ in range(5):
            for layer in cache.layers:
                layer.cumulative_length.fill_(CONTEXT)
            times.append(time_cuda(steps, 1) / DECODE_STEPS)
        ms = sorted(times)[2]
        row = {"decode_ms": ms, "decode_ms_runs": times, "decode_tok_s": batch / ms * 1e3, "compile_s": compile_s,
               "activation_peak_gib": _peak(before), "mutation_analyses": memo_counts()}  # fmt: skip
        if profile:
            row["profile"] = profile_table(step)
    kv_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    row["kv_cache_mib"] = kv_bytes / 2**20
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--budget-s", type=float, default=540)
    p.add_argument("--models", default="static,bf16,dynamic",
                   help="of: bf16, bf16_gqa (GQA-aware SDPA: the fair decode baseline), static, dynamic, fp8row and int4wo "
                        "(torchao's fp8-row and int4 weight-only peers, with GQA-aware SDPA)")
    p.add_argument("--stages", default="prefill,decode_b1,decode_b16")
    p.add_argument("--profile", action="store_true", help="a profiler table of one call per stage")
    p.add_argument("--check", action="store_true",
                   help="static prefill: compare the fresh-cache path with the masked path and eager (a compile more)")
    p.add_argument("--tiny", action="store_true", help="small shapes on the CPU: a smoke test of this script")
    p.add_argument("--lock", type=Path, help="a lock file shared by processes run side by side (see LOCK)")
    args = p.parse_args()
    global CONTEXT, PREFILL, DEVICE, LOCK
    LOCK = args.lock
    if args.tiny:
        CONTEXT, PREFILL, DEVICE = 64, 64, "cpu"
    start = time.perf_counter()
    torch._dynamo.config.cache_size_limit = 64
    result = json.loads(args.json.read_text()) if args.json.exists() else {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (tiny smoke test)", "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "layers": args.layers, "context": CONTEXT, "prefill": PREFILL, "models": {}}
    base = build_model(args.layers, TINY if args.tiny else LLAMA3_8B)

    def save():
        args.json.write_text(json.dumps(result, indent=1))

    stages = args.stages.split(",")
    for kind in args.models.split(","):
        row = result["models"].setdefault(kind, {})
        if all(stage in row for stage in stages):
            print(kind, "already measured in", args.json)
            continue
        if time.perf_counter() - start > args.budget_s:
            print("budget spent before", kind)
            break
        model = base
        if kind != "bf16":
            make = {"fp8row": torchao_fp8row, "int4wo": torchao_int4wo, "bf16_gqa": gqa_aware}.get(kind)
            model, info = make(base) if make else quantized(base, kind, args.calib_samples)
            for k, v in info.items():
                row.setdefault(k, v)  # a resumed run keeps the first (uncontended) quantization time
        row["weights_gib"] = model_bytes(model) / 2**30
        cache_kind = "static" if kind == "static" else "hf"
        if kind == "bf16_gqa":
            row["attention"] = "SDPA enable_gqa=True (no KV-head expansion)"
        for stage in stages:
            if stage in row:
                continue
            if time.perf_counter() - start > args.budget_s:
                break
            try:
                if stage == "prefill":
                    row[stage] = bench_prefill(model, cache_kind, args.profile, args.check)
                else:
                    row[stage] = bench_decode(model, cache_kind, int(stage.removeprefix("decode_b")), args.profile)
            except torch.OutOfMemoryError as e:  # keep what the GPU held, for the next reader; go on
                row[stage] = {"error": str(e).splitlines()[0], "memory": memory_report()}
                print(kind, stage, "out of memory:", json.dumps(row[stage]["memory"]), flush=True)
            save()
        print(kind, json.dumps({k: {f: x for f, x in v.items() if f != "profile"} if isinstance(v, dict) else v
                                for k, v in row.items()}), flush=True)  # fmt: skip
        base.config._attn_implementation = "sdpa"  # bf16_gqa changed the shared model's attention
        if model is not base:
            del model
        torch._dynamo.reset()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    print_table(result)


def print_table(result: dict) -> None:
    models = result["models"]
    bf16 = models.get("bf16", {})
    print(f"\n{result['device']}, {result['date']}, torch {result['torch']}, {result['layers']} layers")
    print("| model | prefill 2048 ms | vs bf16 | decode b1 tok/s | vs bf16 | decode b16 tok/s | vs bf16 | KV MiB (b16) |"
          " weights GiB |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind, row in models.items():
        def cell(key, field, higher=True):
            v = row.get(key, {}).get(field)
            ref = bf16.get(key, {}).get(field)
            if v is None:
                return "-", "-"
            ratio = (v / ref if higher else ref / v) if ref else None
            return f"{v:.1f}", f"{ratio:.2f}x" if ratio else "-"

        pre, pre_x = cell("prefill", "prefill_ms", higher=False)
        d1, d1_x = cell("decode_b1", "decode_tok_s")
        d16, d16_x = cell("decode_b16", "decode_tok_s")
        kv = row.get("decode_b16", {}).get("kv_cache_mib")
        weights = row.get("weights_gib", 0)
        kv_s = f"{kv:.1f}" if kv else "-"
        print(f"| {kind} | {pre} | {pre_x} | {d1} | {d1_x} | {d16} | {d16_x} | {kv_s} | {weights:.2f} |")
    for kind, row in models.items():
        for stage, r in row.items():
            if isinstance(r, dict) and "profile" in r:
                print(f"\n{kind}, {stage}:\n{r['profile']}")


if __name__ == "__main__":
    main()
