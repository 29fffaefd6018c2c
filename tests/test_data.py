import json

import pytest
import torch

from pq_ao import data


def test_wikitext2_test_is_the_hf_join():
    text = data.load("wikitext2")
    # "\n\n".join of the 4358 HF rows: 1,294,336 characters (the HF dataset viewer's count), not the raw file's 1,290,590 B
    assert len(text) == 1_294_336
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    assert text.endswith("Ed Parker , and Eddie Pelkey . \n\n\n")  # the last row is blank


def test_wikitext2_valid_differs_from_test():
    assert data.load("wikitext2_valid").startswith("\n\n = Homarus gammarus = \n\n")


@pytest.mark.parametrize(
    "name, n, keys",
    [
        ("piqa", 1838, {"goal", "sol1", "sol2", "label"}),
        ("arc_easy", 2376, {"id", "question", "choices", "answerKey"}),
        ("arc_challenge", 1172, {"id", "question", "choices", "answerKey"}),
        ("hellaswag", 10042, {"activity_label", "ctx_a", "ctx_b", "endings", "label"}),
        ("winogrande", 1267, {"sentence", "option1", "option2", "answer"}),
        ("lambada_openai", 5153, {"text"}),
    ],
)
def test_task_sizes_and_hf_schema(name, n, keys):
    docs = data.load(name)
    assert len(docs) == n
    assert keys <= set(docs[0])


def test_task_fields_converted_to_hf_types():
    piqa = data.load("piqa")
    assert {d["label"] for d in piqa} == {0, 1}
    assert piqa[1] == {"goal": "dresser", "sol1": "replace drawer with bobby pin ",
                       "sol2": "finish, woodgrain with  bobby pin ", "label": 1}  # fmt: skip
    arc = data.load("arc_easy")[14]  # one of the items with numeric labels
    assert arc["question"] == "All living and nonliving material is composed of"
    assert arc["choices"] == {"text": ["air", "elements", "water", "soil"], "label": ["1", "2", "3", "4"]}
    assert arc["answerKey"] == "2"
    assert data.load("hellaswag")[0]["label"] == "3"  # HF stores hellaswag labels as strings
    assert data.load("winogrande")[0]["answer"] == "2"


def test_calibration_text_is_documents():
    c4 = data.load("c4")
    wiki = data.load("wiki")
    assert len(c4) == 2000 and all(isinstance(d, str) and d for d in c4)
    assert len(wiki) == 2349
    assert wiki[0].startswith("2007 European Parliament election in Romania\n\n")
    assert not any("<doc" in d or "</doc>" in d for d in wiki)


def test_env_dir_comes_first_then_shared(data_dir, write_file):
    write_file(data_dir / "wikitext2" / "wiki.test.raw", " = A = \n \n b c \n")
    write_file(data_dir / "piqa" / "valid.jsonl", json.dumps({"goal": "g", "sol1": "x", "sol2": "y"}) + "\n")
    write_file(data_dir / "piqa" / "valid-labels.lst", "1\n")
    # rows [" = A = \n", "", " b c \n"] joined by "\n\n"
    assert data.load("wikitext2") == " = A = \n\n\n\n\n b c \n"
    assert data.load("piqa") == [{"goal": "g", "sol1": "x", "sol2": "y", "label": 1}]
    assert len(data.load("winogrande")) == 1267  # not in the env dir: the shared copy
    assert data.data_dirs()[0] == data_dir


def test_a_partial_local_copy_is_not_used(data_dir, write_file, no_shared_data):
    write_file(data_dir / "piqa" / "valid.jsonl", "{}\n")  # labels file missing
    assert data.local_files("piqa") is None
    with pytest.raises(data.DatasetNotFoundError):
        data.load("piqa")


def test_offline_and_missing_says_where_it_looked(data_dir, no_shared_data, tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.load("wikitext2")
    msg = str(e.value)
    assert (
        "wikitext2/wiki.test.raw" in msg
        and str(data_dir) in msg
        and str(tmp_path / "no_shared" / "data") in msg
    )
    assert "HF_HUB_OFFLINE" in msg
    with pytest.raises(FileNotFoundError):  # DatasetNotFoundError is a FileNotFoundError
        data.check_available("hellaswag")


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_either_offline_variable_stops_the_hub(monkeypatch, data_dir, no_shared_data, var):
    import datasets

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setenv(var, "true")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("hub used while offline"))
    with pytest.raises(data.DatasetNotFoundError, match=var):
        data.load("lambada_openai")


def test_online_falls_back_to_the_hub(monkeypatch, data_dir, no_shared_data):
    import datasets

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"text": [" = A = \n", "", " b c \n"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    # the hub's rows give the same string as the local file in test_env_dir_comes_first_then_shared
    assert data.load("wikitext2") == " = A = \n\n\n\n\n b c \n"
    assert data.load("lambada_openai") == [{"text": " = A = \n"}, {"text": ""}, {"text": " b c \n"}]
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
                     ("EleutherAI/lambada_openai", "default", "test")]  # fmt: skip


def test_hub_failure_is_a_clear_error(monkeypatch, data_dir, no_shared_data):
    import datasets

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach the hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(
        data.DatasetNotFoundError, match="baber/piqa validation.*ConnectionError: Couldn't reach"
    ):
        data.load("piqa")


def test_unknown_dataset_lists_known_names():
    with pytest.raises(ValueError, match="unknown dataset 'wikitext3'.*wikitext2 .*hellaswag"):
        data.load("wikitext3")


def test_calibration_tokens_reproducible_and_without_special_tokens(stories):
    _, tok = stories
    a = data.calibration_tokens(tok, "c4", n=8, seqlen=64, seed=0)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, data.calibration_tokens(tok, "c4", n=8, seqlen=64, seed=0))
    assert not torch.equal(a, data.calibration_tokens(tok, "c4", n=8, seqlen=64, seed=1))
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # this tokenizer adds a BOS by default ...
    assert not (a == tok.bos_token_id).any()  # ... and the sampler does not
    assert len({tuple(w) for w in a.tolist()}) == 8


def test_calibration_windows_are_disjoint_slices_of_the_text(stories, data_dir, write_file):
    _, tok = stories
    doc = " ".join(f"word{i}" for i in range(400))
    write_file(data_dir / "calibration" / "wiki.utf8", f'<doc id="1" url="u" title="t">\n{doc}\n</doc>\n')
    assert data.load("wiki") == [doc]
    stream = (
        tok(doc, add_special_tokens=False)["input_ids"] + tok("\n\n", add_special_tokens=False)["input_ids"]
    )
    windows = data.calibration_tokens(tok, "wiki", n=5, seqlen=50, seed=3).tolist()
    starts = [next(s for s in range(len(stream) - 49) if stream[s : s + 50] == w) for w in windows]
    assert all(b - a >= 50 for a, b in zip(starts, starts[1:]))
    assert len(set(starts)) == 5


def test_calibration_errors(stories, data_dir, write_file):
    _, tok = stories
    write_file(data_dir / "calibration" / "wiki.utf8", '<doc id="1">\nshort text\n</doc>\n')
    with pytest.raises(ValueError, match="fewer than n \\* seqlen"):
        data.calibration_tokens(tok, "wiki", n=4, seqlen=512)
    with pytest.raises(ValueError, match="must be positive"):
        data.calibration_tokens(tok, "c4", n=0)
    with pytest.raises(ValueError, match="not calibration text"):
        data.calibration_tokens(tok, "piqa")
