import json

import pytest
import torch

from pq_ao import cli
from pq_ao.eval.perplexity import perplexity


def test_eval_writes_the_documented_json(stories, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = cli.main(["eval", "--model", "stories260k", "--dtype", "fp32", "--tasks", "wikitext2,winogrande",
                   "--seqlen", "64", "--limit", "2", "--json", str(out)])  # fmt: skip
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["complete"] is True
    assert (r["model"], r["dtype"], r["seqlen"], r["limit"], r["tasks"]) == (
        "stories260k", "fp32", 64, 2, ["wikitext2", "winogrande"])  # fmt: skip
    assert set(r["versions"]) == {"torch", "transformers", "lm_eval", "python"}
    assert r["versions"]["torch"] == torch.__version__
    assert r["machine"]["device"] == "cpu"
    assert {"load_model", "total"} <= set(r["wall_seconds"])
    model, tok = stories  # the same fp32 weights, so the same number
    expected = perplexity(model, tok, seqlen=64, max_windows=2, progress=False)
    assert r["results"]["wikitext2"]["ppl"] == pytest.approx(expected.ppl, rel=1e-6)
    assert r["results"]["wikitext2"]["n_windows"] == 2
    assert r["results"]["winogrande"]["n"] == 2 and 0 <= r["results"]["winogrande"]["acc"] <= 1
    assert r["summary"] == {"avg5": None, "avg5_acc": None}  # only one of the five paper tasks ran
    table = capsys.readouterr().out
    assert "wikitext2" in table and f"{expected.ppl:.4f}" in table and "winogrande" in table


def _error(capsys, argv) -> str:
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_unknown_model_is_a_one_line_error(capsys):
    err = _error(capsys, ["eval", "--model", "no-such-model", "--tasks", "wikitext2"])
    assert err.startswith("pq-ao eval: error: unknown model 'no-such-model'")


def test_unknown_task_fails_before_loading(capsys):
    err = _error(capsys, ["eval", "--model", "no-such-model", "--tasks", "wikitext2,mmlu"])
    assert "unknown task(s) ['mmlu']" in err and "lambada_openai" in err


def test_missing_dataset_fails_before_loading(capsys, data_dir, no_shared_data):
    err = _error(capsys, ["eval", "--model", "no-such-model", "--tasks", "piqa"])
    assert "dataset 'piqa' not found locally" in err and str(data_dir) in err


def test_seqlen_too_long_is_an_error(capsys, data_dir, write_file, tmp_path):
    write_file(data_dir / "wikitext2" / "wiki.test.raw", " = Short = \n \n A few words . \n")
    out = tmp_path / "r.json"
    err = _error(capsys, ["eval", "--model", "stories260k", "--seqlen", "4096", "--json", str(out)])
    assert "seqlen 4096 is longer than the tokenized text" in err
    assert json.loads(out.read_text())["complete"] is False  # what ran is saved, marked incomplete


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--tasks", "wikitext2"])  # --model missing
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        cli.main([])


def test_a_subcommand_is_one_registered_function(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_SUBCOMMANDS", dict(cli._SUBCOMMANDS))

    @cli.subcommand(cli.arg("--times", type=int, default=1))
    def cmd_say_hi(args):
        """Print hi."""
        print("hi " * args.times)
        return 3

    assert cli.main(["say-hi", "--times", "2"]) == 3
    assert capsys.readouterr().out.strip() == "hi hi"
    assert "say-hi" in cli.build_parser().format_help()
