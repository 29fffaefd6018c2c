from pathlib import Path

import pytest
import yaml

from pq_ao import data
from pq_ao.eval import zeroshot


def _requests(task_name: str, index: int):
    """(the (context, continuation) pairs lm-eval scores for example `index`, the task, the example)."""
    task = zeroshot.build_task(task_name, limit=index + 1)
    task.set_config("num_fewshot", 0)
    task.build_all_requests(limit=index + 1)
    reqs = sorted((r for r in task.instances if r.doc_id == index), key=lambda r: r.idx)
    return [r.arguments for r in reqs], task, task.eval_docs[index]


def _acc_if_best(task, doc, n_choices: int, best: int) -> dict:
    """lm-eval's metrics for `doc` when choice `best` gets by far the highest loglikelihood (so that length
    normalisation cannot change the winner)."""
    return task.process_results(doc, [(0.0 if i == best else -50.0, False) for i in range(n_choices)])


def test_piqa_requests():
    reqs, task, doc = _requests("piqa", 1)
    ctx = "Question: dresser\nAnswer:"
    assert reqs == [(ctx, " replace drawer with bobby pin "), (ctx, " finish, woodgrain with  bobby pin ")]
    assert _acc_if_best(task, doc, 2, 1) == {"acc": 1.0, "acc_norm": 1.0}
    assert _acc_if_best(task, doc, 2, 0)["acc"] == 0.0


def test_arc_requests_with_numeric_labels():
    reqs, task, doc = _requests("arc_easy", 14)
    ctx = "Question: All living and nonliving material is composed of\nAnswer:"
    assert reqs == [(ctx, " air"), (ctx, " elements"), (ctx, " water"), (ctx, " soil")]
    assert _acc_if_best(task, doc, 4, 1)["acc"] == 1.0  # answerKey "2" is the second choice
    reqs, task, doc = _requests("arc_challenge", 0)
    assert reqs[0][0] == (
        "Question: An astronomer observes that a planet rotates faster after a meteorite impact. "
        "Which is the most likely effect of this increase in rotation?\nAnswer:"
    )
    assert reqs[3][1] == " Planetary gravity will become stronger."
    assert _acc_if_best(task, doc, 4, 2)["acc"] == 1.0  # answerKey "C"


def test_hellaswag_requests_activitynet():
    reqs, task, doc = _requests("hellaswag", 0)
    ctx = "Roof shingle removal: A man is sitting on a roof. He"  # ctx_b "he" capitalised
    endings = [" is using wrap to wrap a pair of skis.", " is ripping level tiles off.",
               " is holding a rubik's cube.", " starts pulling up roofing on a roof."]  # fmt: skip
    assert reqs == [(ctx, e) for e in endings]
    assert _acc_if_best(task, doc, 4, 3) == {"acc": 1.0, "acc_norm": 1.0}


def test_hellaswag_requests_wikihow_brackets():
    reqs, task, doc = _requests("hellaswag", 3243)
    assert reqs[3] == (
        "Personal Care and Style: How to become a fashion consultant. Obtain your high school diploma or "
        "ged. This job requires a high school diploma or equivalent, so make sure to apply yourself and "
        "finish school. If your high school offers these classes, take art, design, and sewing to "
        "familiarize yourself with foundational concepts in fashion.",
        # "[title] Earn" -> " Earn" after the bracket removal, plus lm-eval's " " delimiter: two spaces
        "  Earn a bachelor's degree in a fashion-related field. Degrees for the fashion industry include "
        "art, fashion merchandising, and marketing.",
    )
    assert _acc_if_best(task, doc, 4, 3)["acc"] == 1.0


def test_winogrande_partial_scoring_requests():
    reqs, task, doc = _requests("winogrande", 0)
    assert reqs == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    ]
    assert _acc_if_best(task, doc, 2, 1) == {"acc": 1.0}  # answer "2"
    assert _acc_if_best(task, doc, 2, 0) == {"acc": 0.0}


def test_lambada_request_is_text_minus_last_word():
    reqs, _, _ = _requests("lambada_openai", 0)
    text = data.load("lambada_openai")[0]["text"]
    assert text.endswith("I don't care about signs")
    assert reqs == [(text[: -len(" signs")], " signs")]


def _bundled_yaml(path: str) -> dict:
    import lm_eval

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")
    return yaml.load((Path(lm_eval.__file__).parent / "tasks" / path).read_text(), Loader=Loader)


@pytest.mark.parametrize(
    "task, path",
    [("piqa", "piqa/piqa.yaml"), ("arc_easy", "arc/arc_easy.yaml"), ("hellaswag", "hellaswag/hellaswag.yaml"),
     ("lambada_openai", "lambada/lambada_openai.yaml")],
)  # fmt: skip
def test_templates_equal_the_installed_lm_eval_yamls(task, path):
    """Guards an lm-eval upgrade: our template strings are the bundled task's."""
    ours, theirs = zeroshot.task_config(task), _bundled_yaml(path)
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice", "output_type"):
        if isinstance(ours.get(key), str):
            assert ours[key] == theirs[key], key
    assert [m["metric"] for m in ours["metric_list"]] == [m["metric"] for m in theirs["metric_list"]]


def test_all_tasks_run_on_stories260k(stories):
    model, tok = stories
    seen = []
    out = zeroshot.evaluate(
        model, tok, zeroshot.TASKS, limit=3, batch_size=4, on_task=lambda t, m: seen.append(t)
    )
    assert seen == list(zeroshot.TASKS)
    for task, metrics in out["tasks"].items():
        assert metrics["n"] == 3, task
        keys = {"acc", "acc_norm"} if task in ("piqa", "arc_easy", "arc_challenge", "hellaswag") else {"acc"}
        assert keys <= set(metrics), task
        assert all(0.0 <= metrics[k] <= 1.0 for k in keys), task
    assert "acc_norm" not in out["tasks"]["winogrande"]
    assert out["tasks"]["lambada_openai"]["ppl"] > 1.0
    avg5, avg5_acc = zeroshot.paper_average(out["tasks"])
    assert (out["avg5"], out["avg5_acc"]) == (avg5, avg5_acc)
    assert 0.0 <= avg5 <= 1.0


def test_paper_average_uses_acc_norm_except_winogrande():
    per_task = {
        "piqa": {"acc": 0.1, "acc_norm": 0.6},
        "arc_easy": {"acc": 0.1, "acc_norm": 0.5},
        "arc_challenge": {"acc": 0.1, "acc_norm": 0.3},
        "hellaswag": {"acc": 0.1, "acc_norm": 0.4},
        "winogrande": {"acc": 0.7},
    }
    avg5, avg5_acc = zeroshot.paper_average(per_task)
    assert avg5 == pytest.approx((0.6 + 0.5 + 0.3 + 0.4 + 0.7) / 5)
    assert avg5_acc == pytest.approx((0.1 * 4 + 0.7) / 5)
    assert zeroshot.paper_average({k: v for k, v in per_task.items() if k != "hellaswag"}) == (None, None)


def test_unknown_task_and_missing_data(stories, data_dir, no_shared_data):
    model, tok = stories
    with pytest.raises(ValueError, match="unknown zero-shot task 'mmlu'.*hellaswag"):
        zeroshot.evaluate(model, tok, ["mmlu"])
    with pytest.raises(ValueError, match="limit must be positive"):
        zeroshot.evaluate(model, tok, ["piqa"], limit=0)
    with pytest.raises(data.DatasetNotFoundError, match="piqa/valid.jsonl"):
        zeroshot.build_task("piqa")


@pytest.mark.slow
def test_smollm2_beats_chance_on_arc_easy(smollm2):
    """stories260K is at chance everywhere; a real model tells whether gold labels line up with choices."""
    model, tok = smollm2
    out = zeroshot.evaluate(model, tok, ["arc_easy"], limit=12, batch_size=16)
    # 8/12 here (0.516 on all 2376); chance is 0.25, and 6 or more of 12 by chance has probability 0.05
    assert out["tasks"]["arc_easy"]["acc"] >= 0.5
