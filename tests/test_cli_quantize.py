import json

from pq_ao.cli import main


def test_quantize_then_eval_the_saved_directory(tmp_path, capsys):
    """Then: quantizing the saved directory again is refused in one line (after the progress lines), and an eval
    window longer than the model's positions warns."""
    out = tmp_path / "q"
    rc = main(["quantize", "--model", "stories260k", "--config", "w4a4kv4", "--out", str(out), "--n-samples", "4",
               "--calib-seqlen", "128", "--grid-samples", "1", "--grid-seqlen", "128", "--json", str(tmp_path / "q.json")])
    assert rc == 0
    report = json.loads((tmp_path / "q.json").read_text())
    assert report["report"]["prefix"]["prefix_ids"][-1] == 1
    assert "prefix" in capsys.readouterr().out
    rc = main(["eval", "--model", str(out), "--tasks", "wikitext2", "--seqlen", "128", "--limit", "3",
               "--json", str(tmp_path / "e.json")])
    assert rc == 0
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["results"]["wikitext2"]["n_windows"] == 3 and 1 < res["results"]["wikitext2"]["ppl"] < 2000
    # zero-shot too: the Llama tokenizer adds BOS by default, which the prefix model (its prefix ends with BOS) rejects
    assert main(["eval", "--model", str(out), "--tasks", "piqa", "--limit", "2", "--json", str(tmp_path / "z.json")]) == 0
    assert json.loads((tmp_path / "z.json").read_text())["results"]["piqa"]["n"] == 2
    capsys.readouterr()
    assert main(["quantize", "--model", str(out), "--config", "w4a4kv4", "--out", str(tmp_path / "again")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()  # the progress lines, then the error in one line
    assert lines[-1].startswith("pq-ao quantize: error: this model is already quantized by pq_ao")
    assert all(line.startswith("pq-ao quantize: ") for line in lines)  # no traceback
    assert main(["eval", "--model", str(out), "--tasks", "wikitext2", "--seqlen", "512", "--limit", "1"]) == 0
    assert "exceeds the model's max_position_embeddings (512)" in capsys.readouterr().err


def test_quantize_rejects_an_unknown_config(tmp_path, capsys):
    rc = main(["quantize", "--model", "stories260k", "--config", "w2a2", "--out", str(tmp_path / "x")])
    assert rc == 1
    assert "unknown config 'w2a2'" in capsys.readouterr().err


def test_an_unwritable_out_is_refused_before_quantizing(tmp_path, capsys, monkeypatch):
    import pq_ao

    monkeypatch.setattr(pq_ao, "quantize_", lambda *a, **k: (_ for _ in ()).throw(AssertionError("quantized")))
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc = main(["quantize", "--model", "stories260k", "--config", "w4a4kv4", "--out", str(blocker / "q")])
    err = capsys.readouterr().err
    assert rc == 1 and "cannot write to --out" in err and len(err.strip().splitlines()) == 1
    rc = main(["quantize", "--model", "stories260k", "--config", "w4a4kv4", "--out", str(blocker)])
    assert rc == 1 and "exists and is not a directory" in capsys.readouterr().err
