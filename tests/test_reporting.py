"""pq_ao.reporting: the report drawn from a stories260K model quantized by `pq-ao quantize` (w4a4kv4 with the small
settings of prefixquant_w4a4(n_samples=8, seqlen=128, grid_samples=1, grid_seqlen=128)), through the API and the
`pq-ao report` command, and the one-line message without matplotlib.

(Named test_reporting.py after the module: tests/eval/test_report.py already holds the basename test_report, and
two test modules of one basename do not collect together in this rootdir layout.)"""

import contextlib
import io
import json
import sys

import pytest
import torch

import pq_ao
from pq_ao.cli import main
from pq_ao.quant_math import scale_from_absmax
from pq_ao.reporting import FIGURES, REPORT_DATA, MissingExtraError, collect, worst_blocks

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """(directory written by `pq-ao quantize`, what the command wrote on stderr)."""
    out = tmp_path_factory.mktemp("report") / "q"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["quantize", "--model", "stories260k", "--config", "w4a4kv4", "--out", str(out), "--n-samples", "8",
                   "--calib-seqlen", "128", "--grid-samples", "1", "--grid-seqlen", "128"])  # fmt: skip
    assert rc == 0
    return out, err.getvalue()


def png_size(path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk of a PNG file (AssertionError if it is not one)."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def check_report(md_path, data) -> str:
    """Every figure exists, is a PNG of sensible size and is named in report.md; the markdown names the prefix tokens
    and the worst block. Returns the markdown."""
    md = md_path.read_text()
    for name in FIGURES.values():
        w, h = png_size(md_path.parent / name)
        assert 300 <= w <= 4000 and 300 <= h <= 4000, (name, w, h)
        assert f"]({name})" in md
    assert data["prefix"]["tokens"] == ["<s>"] and "`'<s>'`" in md
    worst = worst_blocks(data)[0]
    assert worst == max(range(5), key=lambda i: data["quantization"]["blocks"][i]["mse_after"])
    assert f"**Worst block: {worst}**" in md
    return md


def test_quantize_logs_each_phase_and_writes_the_report_data(quantized):
    out, err = quantized
    for phase in ("loading stories260k", "w4a4kv4: calibration data (c4)", "model structure",
                  "folding the norms, rotating", "outlier tokens: 8 x 128", "prefix ['<s>']",
                  "calibrating 5 blocks on 1 x 128 tokens", "saving to", "quantized in"):
        assert f"pq-ao quantize: {phase}" in err, phase
    data = json.loads((out / REPORT_DATA).read_text())
    prefix = data["quantization"]["prefix"]
    assert len(prefix["token_max_before"]) == len(prefix["token_max_after"]) == 5
    for layer in prefix["token_max_before"] + prefix["token_max_after"]:
        assert layer["top1"] >= layer["top2"] >= layer["median"] > 0
        assert layer["tokens"] and all(t["count"] >= 1 and t["positions"] for t in layer["tokens"])
    assert sum(t["count"] for t in prefix["token_max_before"][0]["tokens"]) <= 2 * 8  # 2 ranks x 8 samples
    assert len(data["prefix_kv"]) == 5 and data["prefix"] == {"ids": [1], "tokens": ["<s>"], "positions": [0]}


def test_report_of_the_quantized_model(quantized, tmp_path):
    """The model's data equal the data `pq-ao quantize` wrote (drawn later, the report is the same); the static
    scales are the min-max scales times the chosen clips, as the model holds them; the report draws every figure."""
    out, _ = quantized
    model, _ = pq_ao.load_quantized(out)
    data = collect(model)
    assert data == json.loads((out / REPORT_DATA).read_text())
    for b in data["quantization"]["blocks"]:
        for site, clip in b["act_clip"].items():
            assert b["act_scale"][site] == (scale_from_absmax(torch.tensor([b["act_absmax"][site]]), 4) * clip).item()
    attn = model.model.layers[2].self_attn
    assert data["prefix_kv"][2]["k_absmax"] == [attn.prefix_k[0, :, 0].abs().max().item()]
    assert data["prefix_kv"][2]["v_range"] == (attn.v_quant.scale * 7.5).tolist()
    md = check_report(pq_ao.report(model, out=tmp_path / "r"), data)
    assert "## Evaluation" not in md  # no eval results given
    with pytest.raises(ValueError, match="needs out="):
        pq_ao.report(model)


def _eval_json(path, model, ppl, acc_norm):
    path.write_text(json.dumps({"schema": 1, "command": "eval", "model": model, "seqlen": 128, "limit": 3,
                                "complete": True, "results": {"wikitext2": {"ppl": ppl},
                                                              "piqa": {"acc": 0.5, "acc_norm": acc_norm}},
                                "summary": {"avg5": None}}))  # fmt: skip


def test_pq_ao_report_command(quantized, tmp_path, capsys):
    """`pq-ao report DIR` draws into DIR/report from the report data, with the FP vs quantized table of the eval
    JSONs in DIR (and only those: config.json and report_data.json are not eval results)."""
    out, _ = quantized
    _eval_json(out / "eval_fp.json", "stories260k", 12.5, 0.61)
    _eval_json(out / "eval_q.json", str(out), 14.25, 0.583)
    try:
        assert main(["report", str(out)]) == 0
    finally:
        (out / "eval_fp.json").unlink()
        (out / "eval_q.json").unlink()
    assert f"wrote {out / 'report' / 'report.md'} and 4 figures" in capsys.readouterr().out
    data = json.loads((out / REPORT_DATA).read_text())
    md = check_report(out / "report" / "report.md", data)
    assert "| task | metric | FP (stories260k) | w4a4kv4 (q) |" in md
    assert "| wikitext2 | ppl | 12.50 | 14.25 |" in md and "| piqa | acc_norm % | 61.00 | 58.30 |" in md
    assert main(["report", str(tmp_path)]) == 1  # not a quantized model directory: one line
    err = capsys.readouterr().err
    assert "is not a quantized model directory" in err and len(err.strip().splitlines()) == 1


def test_without_matplotlib_the_report_names_the_extra(quantized, tmp_path, monkeypatch, capsys):
    out, _ = quantized
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'pq-ao\[report\]'"):
        pq_ao.report(out, out=tmp_path / "r")
    assert main(["report", str(out), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "pq-ao report: error: drawing the report needs matplotlib" in err and "pq-ao[report]" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()  # refused before any work
