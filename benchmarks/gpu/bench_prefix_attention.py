"""GPU box: prefill attention with a PrefixQuant prefix (P keys visible to every query, the rest causal) against
bf16 SDPA without a prefix, at Llama-3-8B shapes (Hq 32, Hkv 8, D 128), batch 1, T in {2048, 8192}.

    PYTHONPATH=. python3 benchmarks/gpu/bench_prefix_attention.py --json $OUT/prefix_attention.json

Rows: `sdpa_causal` (what bf16 runs, no prefix, `enable_gqa`), `cat_mask` (PrefixAttention._attend's SDPA
fallback: prefix concatenated, a materialised bool mask, heads repeated), `flex` (FlexAttention, compiled, a block
mask: prefix columns + causal offset, GQA native), `slots_*` (over every slot of the int KV cache, as the static
model's prefill attends: FlexAttention with the model's bool `keep` mask or the same visibility from index
arithmetic, and SDPA `enable_gqa` with the bool mask, what bf16_gqa's prefill runs), `codes_*` (the same from the
int4 codes, decoded in the attention's graph or in one of their own). Each checked against an fp32 math reference
on the same inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pq_ao.nn.attention import _extend_mask  # noqa: E402

DEV = "cuda"


def reference(q, k, v, p, scale):
    hq, hkv = q.shape[1], k.shape[1]
    k = k.float().repeat_interleave(hq // hkv, 1)
    v = v.float().repeat_interleave(hq // hkv, 1)
    s = (q.float() @ k.transpose(-1, -2)) * scale
    t, kv = q.shape[2], k.shape[2]
    keep = torch.ones(t, kv, dtype=torch.bool, device=q.device).tril(kv - t)
    keep[:, :p] = True
    return torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v


def kernel_names(fn) -> list[str]:
    """The GPU kernels one call launches (which SDPA backend ran), names cut to 80 characters."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sorted({e.name[:80] for e in prof.events() if e.device_type.name == "CUDA"})
    except Exception as e:  # noqa: BLE001 - the names are a remark, never a reason to lose the timing
        return [f"{type(e).__name__}: {e}"[:200]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--t", default="2048,8192", help="sequence lengths")
    ap.add_argument("--rows", default="", help="only these variants (comma-separated; default all)")
    args = ap.parse_args()
    only = set(filter(None, args.rows.split(",")))
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"), rows=[])
    hq, hkv, d, p = 32, 8, 128, 4
    scale = d**-0.5
    for t in (int(v) for v in args.t.split(",")):
        g = torch.Generator(device=DEV).manual_seed(t)
        q = torch.randn(1, hq, t, d, device=DEV, dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, hkv, t, d, device=DEV, dtype=torch.bfloat16, generator=g)
        v = torch.randn(1, hkv, t, d, device=DEV, dtype=torch.bfloat16, generator=g)
        pk = torch.randn(1, hkv, p, d, device=DEV, dtype=torch.bfloat16, generator=g) * 4
        pv = torch.randn(1, hkv, p, d, device=DEV, dtype=torch.bfloat16, generator=g)
        kp, vp = torch.cat([pk, k], 2), torch.cat([pv, v], 2)

        def sdpa_causal():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

        def cat_mask():
            mask = _extend_mask(None, t, t, p, q.device)
            kk = torch.cat([pk, k], 2).repeat_interleave(hq // hkv, 1)
            vv = torch.cat([pv, v], 2).repeat_interleave(hq // hkv, 1)
            return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale)

        def mask_mod(b, h, qi, ki):
            return (ki < p) | (ki - p <= qi)

        bm = create_block_mask(mask_mod, 1, 1, t, t + p, device=DEV)

        def flex_row():
            return flex(q, kp, vp, block_mask=bm, scale=scale, enable_gqa=True)

        def flex_opts(**opts):
            return lambda: flex(q, kp, vp, block_mask=bm, scale=scale, enable_gqa=True, kernel_options=opts)

        from torch.nn.attention.bias import causal_lower_right

        lr = causal_lower_right(t, t + p)

        def lower_right_gqa():
            return F.scaled_dot_product_attention(q, kp, vp, attn_mask=lr, scale=scale, enable_gqa=True)

        def lower_right_expand():
            kk = kp.repeat_interleave(hq // hkv, 1)
            vv = vp.repeat_interleave(hq // hkv, 1)
            return F.scaled_dot_product_attention(q, kk, vv, attn_mask=lr, scale=scale)

        def lower_right_flash():
            kk = kp.repeat_interleave(hq // hkv, 1)
            vv = vp.repeat_interleave(hq // hkv, 1)
            return torch.ops.aten._scaled_dot_product_flash_attention(q, kk, vv, 0.0, True, False, scale=scale)[0]

        lr_compiled = torch.compile(lower_right_gqa)

        # As the static model's prefill runs it (`PrefixAttention._attend_slots`): keys over every slot of the
        # int KV cache (T + 16 here, as bench_e2e sizes it), the new tokens in the first T, the rest hidden by a
        # mask built inside the compiled call from the cache's start position (a 0-d tensor), with and without the
        # bool `keep` tensor the model gathers from.
        from pq_ao.nn import flex_prefix as prefix_flex  # (named apart from the module-level `flex` row)

        slots = t + 16
        ks = torch.cat([pk, k, torch.randn(1, hkv, 16, d, device=DEV, dtype=torch.bfloat16, generator=g)], 2)
        vs = torch.cat([pv, v, torch.randn(1, hkv, 16, d, device=DEV, dtype=torch.bfloat16, generator=g)], 2)
        start = torch.zeros((), dtype=torch.long, device=DEV)

        @torch.compile(dynamic=False, fullgraph=True)
        def slots_keep(q, ks, vs, start, **opts):
            pos = start + torch.arange(t, device=DEV)
            keep = (torch.arange(slots, device=DEV)[None, :] <= pos[:, None])[None]
            return prefix_flex.prefix_flex_attention(q, ks, vs, keep, p, scale, opts or None)

        @torch.compile(dynamic=False, fullgraph=True)
        def slots_index(q, ks, vs, start, **opts):
            def mask_mod(b, h, qi, ki):
                return (ki < p) | (ki - p <= start + qi)

            bm = create_block_mask(mask_mod, 1, None, t, slots + p, device=DEV)
            return flex_attention(q, ks, vs, block_mask=bm, scale=scale, enable_gqa=True, kernel_options=opts or None)

        slot_mask = torch.cat([torch.ones(t, p, dtype=torch.bool, device=DEV),
                               torch.ones(t, slots, dtype=torch.bool, device=DEV).tril()], 1)[None, None]

        def slots_sdpa_gqa():  # what bf16_gqa's StaticCache prefill runs (cuDNN with a bool mask), with the prefix
            return F.scaled_dot_product_attention(q, ks, vs, attn_mask=slot_mask, scale=scale, enable_gqa=True)

        # The same over a key length padded to a multiple of `mult` (8: cuDNN's alignment; 16, 64, 128: does cuDNN's
        # speed with a mask hang on the key count's alignment?), the pad hidden by the mask.
        def pad_keys(mult):
            extra = -(p + slots) % mult
            kk = torch.cat([ks, torch.zeros(1, hkv, extra, d, device=DEV, dtype=torch.bfloat16)], 2)
            vv = torch.cat([vs, torch.zeros(1, hkv, extra, d, device=DEV, dtype=torch.bfloat16)], 2)
            m = torch.cat([slot_mask, torch.zeros(1, 1, t, extra, dtype=torch.bool, device=DEV)], 3)
            return kk, vv, m

        def padded(mult):
            kk, vv, m = pad_keys(mult)
            return lambda: F.scaled_dot_product_attention(q, kk, vv, attn_mask=m, scale=scale, enable_gqa=True)

        ks8, vs8, _ = pad_keys(8)
        pad = ks8.shape[2] - (p + slots)

        # What bf16_gqa's prefill runs, exactly: no prefix, the static cache's T + 16 slots (a multiple of 16), HF's
        # bool mask over them (85 us a layer in its e2e profile), eager and compiled.
        bf16_mask = torch.ones(t, slots, dtype=torch.bool, device=DEV).tril()[None, None]
        ks_np, vs_np = ks[:, :, p:], vs[:, :, p:]

        def bf16_slots_mask():
            return F.scaled_dot_product_attention(q, ks_np, vs_np, attn_mask=bf16_mask, scale=scale, enable_gqa=True)

        bf16_slots_mask_compiled = torch.compile(bf16_slots_mask, dynamic=False, fullgraph=True)

        @torch.compile(dynamic=False, fullgraph=True)
        def slots_sdpa_compiled(q, ks, vs, start):  # as a compiled model would run it: the mask built in the graph
            pos = start + torch.arange(t, device=DEV)
            keep = torch.arange(slots + pad, device=DEV)[None, :] <= pos[:, None]
            keep = keep & (torch.arange(slots + pad, device=DEV) < slots)
            mask = torch.cat([torch.ones(t, p, dtype=torch.bool, device=DEV), keep], 1)[None, None]
            return F.scaled_dot_product_attention(q, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)

        # From the int4 codes, as the static model's prefill reads its cache (`PrefixAttention._attend_slots`): the
        # slots decoded (unpack, per-head scale) and the prefix put in front inside the same compiled graph as the
        # attention (`codes_fused`: inductor may fuse the decode into the attention kernel's loads), decoded in a
        # graph of its own first (`codes_split`: a real bf16 buffer), and fused with the keep mask passed in as a
        # materialised bool tensor, as HF's static-cache mask arrives (`codes_fused_mask_input`).
        from pq_ao import quant_math

        k_scale = (ks[:, :, p:].float().abs().amax((0, 2, 3)) / 7).contiguous()
        v_scale = (vs[:, :, p:].float().abs().amax((0, 2, 3)) / 7).contiguous()
        k_codes = quant_math.pack_int4(quant_math.quantize(ks[:, :, p:], k_scale.view(1, -1, 1, 1), 4))
        v_codes = quant_math.pack_int4(quant_math.quantize(vs[:, :, p:], v_scale.view(1, -1, 1, 1), 4))

        def decode_slots(k_codes, v_codes):
            k_all = quant_math.dequantize(quant_math.unpack_int4(k_codes), k_scale.view(1, -1, 1, 1), torch.bfloat16)
            v_all = quant_math.dequantize(quant_math.unpack_int4(v_codes), v_scale.view(1, -1, 1, 1), torch.bfloat16)
            return torch.cat([pk, k_all], 2), torch.cat([pv, v_all], 2)

        decode_compiled = torch.compile(decode_slots, dynamic=False, fullgraph=True)

        @torch.compile(dynamic=False, fullgraph=True)
        def codes_fused(q, k_codes, v_codes, start):
            kk, vv = decode_slots(k_codes, v_codes)
            pos = start + torch.arange(t, device=DEV)
            keep = (torch.arange(slots, device=DEV)[None, :] <= pos[:, None])[None]
            return prefix_flex.prefix_flex_attention(q, kk, vv, keep, p, scale)

        @torch.compile(dynamic=False, fullgraph=True)
        def codes_fused_mask_input(q, k_codes, v_codes, keep, **opts):
            kk, vv = decode_slots(k_codes, v_codes)
            return prefix_flex.prefix_flex_attention(q, kk, vv, keep, p, scale, opts or None)

        def codes_split():
            kk, vv = decode_compiled(k_codes, v_codes)
            return slots_keep(q, kk, vv, start)

        keep_input = slot_mask[0, :, :, p:].contiguous()  # [1, T, slots] bool, materialised
        # the decoded slots hold the quantized K/V: compare against the reference over the decoded values
        kq, vq = decode_slots(k_codes, v_codes)
        want_codes = reference(q, kq[:, :, : p + t], vq[:, :, : p + t], p, scale)

        want = reference(q, kp, vp, p, scale)
        base = reference(q, k, v, 0, scale)
        row = dict(t=t, p=p)
        for name, fn, ref in (("sdpa_causal", sdpa_causal, base), ("cat_mask", cat_mask, want),
                              ("flex", flex_row, want),
                              ("flex_128x64_w8_s3", flex_opts(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3), want),
                              ("flex_128x128_w8_s2", flex_opts(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2), want),
                              ("flex_64x64_w4_s3", flex_opts(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3), want),
                              ("lower_right_gqa", lower_right_gqa, want), ("lower_right_expand", lower_right_expand, want),
                              ("lower_right_flash", lower_right_flash, want), ("lower_right_compiled", lr_compiled, want),
                              ("slots_keep", lambda: slots_keep(q, ks, vs, start), want),
                              ("slots_sdpa_gqa", slots_sdpa_gqa, want),
                              ("slots_sdpa_gqa_pad8", padded(8), want),
                              ("bf16_slots_mask", bf16_slots_mask, base),
                              ("bf16_slots_mask_compiled", bf16_slots_mask_compiled, base),
                              ("slots_sdpa_gqa_pad16", padded(16), want),
                              ("slots_sdpa_gqa_pad64", padded(64), want),
                              ("slots_sdpa_gqa_pad128", padded(128), want),
                              ("slots_sdpa_compiled", lambda: slots_sdpa_compiled(q, ks8, vs8, start), want),
                              ("slots_index", lambda: slots_index(q, ks, vs, start), want),
                              ("codes_fused", lambda: codes_fused(q, k_codes, v_codes, start), want_codes),
                              ("codes_split", codes_split, want_codes),
                              ("codes_fused_mask_input", lambda: codes_fused_mask_input(q, k_codes, v_codes, keep_input),
                               want_codes),
                              ("slots_keep_64x64_w4_s3",
                               lambda: slots_keep(q, ks, vs, start, BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
                               want),
                              ("slots_keep_128x64_w8_s2",
                               lambda: slots_keep(q, ks, vs, start, BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
                               want),
                              ("codes_fused_mask_input_64x64_w4_s3",
                               lambda: codes_fused_mask_input(q, k_codes, v_codes, keep_input, BLOCK_M=64, BLOCK_N=64,
                                                              num_warps=4, num_stages=3), want_codes),
                              ("slots_index_64x64_w4_s3",
                               lambda: slots_index(q, ks, vs, start, BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
                               want)):
            if only and name not in only:
                continue
            try:
                out = fn()
                err = float((out.float() - ref).norm() / ref.norm())
                ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
                ms2 = do_bench(fn, warmup=25, rep=100, return_mode="median")
                row[name] = dict(ms=ms, ms_repeat=ms2, rel_err=err, kernels=kernel_names(fn))
            except Exception as e:  # noqa: BLE001
                row[name] = dict(error=f"{type(e).__name__}: {str(e)[:400]}")
            print(t, name, row[name], flush=True)
        res["rows"].append(row)
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
