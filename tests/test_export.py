"""Deployment: `pq-ao quantize` -> `pq-ao export` -> a .pt2 that generates, in a fresh process and without pq_ao,
exactly the tokens the eager quantized model generates with its int4 cache."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import pq_ao
from pq_ao import cli, export
from pq_ao.hf_compat import cache_kwarg
from pq_ao.nn.kv_cache import QuantizedKVCache

RUNTIME = Path(pq_ao.__file__).parent / "runtime.py"
MAX_LEN = 48


def _eager_generate(model, ids, new_tokens):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                              **{cache_kwarg(model): QuantizedKVCache(model, max_cache_len=MAX_LEN)})  # fmt: skip


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """(quantized dir, .pt2) of stories260K W4A4KV4, both made through the CLI."""
    tmp = tmp_path_factory.mktemp("export")
    qdir, pt2 = tmp / "q", tmp / "stories.pt2"
    assert cli.main(["quantize", "--model", "stories260k", "--config", "w4a4kv4", "--out", str(qdir),
                     "--n-samples", "8", "--calib-seqlen", "128", "--grid-samples", "1", "--grid-seqlen", "128"]) == 0
    assert cli.main(["export", "--model", str(qdir), "--out", str(pt2), "--max-len", str(MAX_LEN)]) == 0
    return qdir, pt2


@pytest.fixture(scope="module")
def quantized(package):
    return pq_ao.load_quantized(package[0])


def _standalone_generate(pt2, ids, want, tmp_path, extra: str = "''") -> str:
    """In a fresh process, with `pq_ao/runtime.py` loaded as a standalone file (pq_ao is never imported), greedy
    generation from `pt2` must give `want`; prints 'ok' and `extra` evaluated there; returns stdout."""
    torch.save((ids, want), tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import importlib.util, sys, torch
        spec = importlib.util.spec_from_file_location("standalone_runtime", {str(RUNTIME)!r})
        runtime = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(runtime)
        ids, want = torch.load({str(tmp_path / 'io.pt')!r})
        pkg = runtime.load({str(pt2)!r})
        got = pkg.generate(ids, want.shape[1] - ids.shape[1])
        assert not any(k.split('.')[0] == 'pq_ao' for k in sys.modules), 'pq_ao got imported'
        assert torch.equal(got, want), (got, want)
        print('ok', {extra})
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
    return out.stdout


def _prompt(tok):
    return tok("Once upon a time there was a little", add_special_tokens=False, return_tensors="pt").input_ids


def test_exported_programs_generate_like_eager(quantized):
    model, tok = quantized
    ids = _prompt(tok)
    want = _eager_generate(model, ids, 12)
    spec, eps = export.export_programs(model, batch_size=1, max_cache_len=MAX_LEN)
    inputs = export.example_inputs(spec, 1, "cpu")
    length, kv = inputs[1], inputs[2:]
    with torch.no_grad():
        logits = eps["prefill"].module()(ids, length, *kv)
        out = ids
        for _ in range(12):
            nxt = logits.argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], 1)
            logits = eps["decode"].module()(nxt, length, *kv)
    assert torch.equal(out, want)
    assert int(length) == ids.shape[1] + 12
    ops = {str(n.target) for n in eps["decode"].graph.nodes}
    assert ops >= {"pq_ao.kv_attention.default", "pq_ao.static_linear.default"}


def test_export_programs_by_name(quantized):
    model, _ = quantized
    spec, eps = export.export_programs(model, 1, MAX_LEN, programs=("decode",))
    assert list(eps) == ["decode"] and spec["max_cache_len"] == MAX_LEN
    for bad in ((), ("decode", "verify")):
        with pytest.raises(ValueError, match="programs must be"):
            export.export_programs(model, 1, MAX_LEN, programs=bad)


def test_package_generates_the_eager_tokens_in_a_fresh_process_without_pq_ao(package, quantized, tmp_path):
    model, tok = quantized
    ids = _prompt(tok)
    want = _eager_generate(model, ids, 16)
    text = "pkg.generate_text('Once upon a time there was a little', 8)"
    out = _standalone_generate(package[1], ids, want, tmp_path, text)
    assert out.split("ok", 1)[1].strip() == tok.decode(want[0, ids.shape[1] : ids.shape[1] + 8]).strip()


def test_cli_generate_prints_the_eager_continuation(package, quantized, capsys):
    model, tok = quantized
    ids = _prompt(tok)
    want = tok.decode(_eager_generate(model, ids, 10)[0, ids.shape[1] :])
    prompt = "Once upon a time there was a little"
    assert cli.main(["generate", "--package", str(package[1]), "--prompt", prompt, "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out.strip() == want.strip()


def test_package_metadata_and_runtime_errors(package):
    from pq_ao import runtime

    pkg = runtime.load(package[1])
    spec = pkg.spec
    assert spec["batch_size"] == 1 and spec["max_cache_len"] == MAX_LEN and spec["kv_bits"] == 4
    assert spec["kv_dtype"] == "uint8" and spec["kv_shape"][2] == MAX_LEN and spec["prefix_ids"]
    assert json.loads(json.dumps(spec)) == spec
    assert pkg.prefill.get_metadata()["numerics"] == pkg.decode.get_metadata()["numerics"] == "eager"  # the default
    with pytest.raises(ValueError, match="batch size 1"):
        pkg.step(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="exceed"):
        pkg.step(torch.ones(1, MAX_LEN + 1, dtype=torch.long))


def test_export_cli_refuses_a_plain_model(tmp_path, capsys):
    assert cli.main(["export", "--model", "stories260k", "--out", str(tmp_path / "x.pt2")]) == 1
    assert "not a quantized model directory" in capsys.readouterr().err


# SmolLM2-135M's shapes (tied embeddings, 9 query / 3 KV heads of 64, hidden 576 = 9 * 64: a non-power-of-2
# Hadamard), 2 layers of random weights: the plumbing of the real model's test below in a fraction of its time.
SMOLLM2_SHAPES = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                      head_dim=64, vocab_size=2048, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                      rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=2048)  # fmt: skip


def test_smollm2_shaped_int4_cache_save_load_and_package(tmp_path):
    """SmolLM2-shaped, 2 layers, a prefix of several tokens (a low outlier threshold on random weights): int4-cache
    generation equals HF-cache generation, save/load is bit-exact, and the .pt2 generates the eager tokens in a
    fresh process without pq_ao. (A P > 1 prefix once reached the decode kernel as a non-contiguous constant.)"""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SMOLLM2_SHAPES, num_hidden_layers=2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(1)
    calib = torch.randint(10, config.vocab_size, (4, 64), generator=gen)
    report = pq_ao.quantize_(model, pq_ao.prefixquant_w4a4(calibration=calib, n_samples=4, seqlen=64,
                                                           grid_search=False, eta=1.5, max_prefix_len=3))
    assert len(report.prefix.prefix_ids) > 1
    ids = torch.randint(10, config.vocab_size, (1, 7), generator=gen)
    want = _eager_generate(model, ids, 8)
    with torch.no_grad():
        hf = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0,
                            **{cache_kwarg(model): DynamicCache()})  # fmt: skip
    assert torch.equal(want, hf)
    pq_ao.save_quantized(model, tmp_path / "q")
    loaded, _ = pq_ao.load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, use_cache=False).logits, model(input_ids=ids, use_cache=False).logits)
    pt2 = export.compile_package(loaded, tmp_path / "smollm2_shaped.pt2", 1, MAX_LEN)
    _standalone_generate(pt2, ids, want, tmp_path)


@pytest.mark.slow
def test_smollm2_int4_cache_compile_save_load_and_package(smollm2, tmp_path):
    """SmolLM2-135M end to end (calibration kept tiny: this checks the plumbing, not accuracy): int4-cache generation
    equals HF-cache generation, compiled prefill/decode match eager, save/load is bit-exact, and the .pt2 generates
    the eager tokens in a fresh process without pq_ao."""
    import copy

    from transformers import DynamicCache

    model, tok = copy.deepcopy(smollm2[0]), smollm2[1]
    pq_ao.quantize_(model, pq_ao.prefixquant_w4a4(n_samples=2, seqlen=64, grid_search=False), tokenizer=tok)
    ids = tok("The capital of France is", add_special_tokens=False, return_tensors="pt").input_ids
    kw = cache_kwarg(model)
    want = _eager_generate(model, ids, 8)
    with torch.no_grad():
        hf = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, **{kw: DynamicCache()})
        assert torch.equal(want, hf)
        compiled = torch.compile(model, fullgraph=True)
        cache = QuantizedKVCache(model, max_cache_len=MAX_LEN, batch_size=1)
        got = [compiled(input_ids=want[:, : ids.shape[1]], use_cache=True, **{kw: cache}).logits[:, -1]]
        for t in range(ids.shape[1], want.shape[1] - 1):
            got.append(compiled(input_ids=want[:, t : t + 1], use_cache=True, **{kw: cache}).logits[:, -1])
        assert torch.equal(torch.stack(got, 1).argmax(-1), want[:, ids.shape[1] :])
        torch._dynamo.reset()
    pq_ao.save_quantized(model, tmp_path / "q", tok)
    loaded, _ = pq_ao.load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, use_cache=False).logits, model(input_ids=ids, use_cache=False).logits)
    pt2 = export.compile_package(loaded, tmp_path / "smollm2.pt2", 1, MAX_LEN)
    _standalone_generate(pt2, ids, want, tmp_path)
