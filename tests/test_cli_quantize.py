import json

from pq_ao.cli import main


def test_quantize_then_eval_the_saved_directory(tmp_path, capsys):
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


def test_quantize_rejects_an_unknown_config(tmp_path, capsys):
    rc = main(["quantize", "--model", "stories260k", "--config", "w2a2", "--out", str(tmp_path / "x")])
    assert rc == 1
    assert "unknown config 'w2a2'" in capsys.readouterr().err
