"""Zero-shot accuracy through the lm-eval harness (`lm_eval.simple_evaluate`) on an in-memory model.

Each task is an lm-eval task config dict whose `custom_dataset` serves the examples of `pq_ao.data.load(task)`
(local files first, then the same hub dataset lm-eval's built-in task reads). The prompts are lm-eval 0.4.13's
own: the templates below are those of its bundled task yamls, and hellaswag and winogrande call the
preprocessing functions bundled with lm-eval itself. Scoring is lm-eval's (loglikelihood of each choice;
`acc_norm` divides by the choice's length in bytes; winogrande uses partial scoring: the shared continuation
under each filled-in context).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pq_ao import data
from pq_ao.state import state_of

PAPER_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande")
TASKS = (*PAPER_TASKS, "lambada_openai")
PAPER_METRIC = {"piqa": "acc_norm", "arc_easy": "acc_norm", "arc_challenge": "acc_norm",
                "hellaswag": "acc_norm", "winogrande": "acc"}  # fmt: skip

_ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
_ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}
_PERPLEXITY = {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}
_SPLIT = {"piqa": "validation", "arc_easy": "test", "arc_challenge": "test", "hellaswag": "validation",
          "winogrande": "validation", "lambada_openai": "test"}  # fmt: skip


def _arc_config() -> dict[str, Any]:
    return {
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{choices.label.index(answerKey)}}",
        "doc_to_choice": "{{choices.text}}",
        "metric_list": [_ACC, _ACC_NORM],
    }


def _prompt_config(task: str) -> dict[str, Any]:
    """The prompt and metric fields of lm-eval's bundled config for `task`."""
    if task == "piqa":
        return {
            "doc_to_text": "Question: {{goal}}\nAnswer:",
            "doc_to_target": "label",
            "doc_to_choice": "{{[sol1, sol2]}}",
            "metric_list": [_ACC, _ACC_NORM],
        }
    if task in ("arc_easy", "arc_challenge"):
        return _arc_config()
    if task == "hellaswag":
        from lm_eval.tasks.hellaswag import utils as hellaswag

        return {
            "process_docs": hellaswag.process_docs,
            "doc_to_text": "{{query}}",
            "doc_to_target": "{{label}}",
            "doc_to_choice": "choices",
            "metric_list": [_ACC, _ACC_NORM],
        }
    if task == "winogrande":
        from lm_eval.tasks.winogrande import preprocess_winogrande as winogrande

        return {
            "doc_to_text": winogrande.doc_to_text,
            "doc_to_target": winogrande.doc_to_target,
            "doc_to_choice": winogrande.doc_to_choice,
            "metric_list": [_ACC],
        }
    if task == "lambada_openai":
        return {
            "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
            "doc_to_target": "{{' '+text.split(' ')[-1]}}",
            "metric_list": [_PERPLEXITY, _ACC],
        }
    raise ValueError(f"unknown zero-shot task {task!r}; known tasks: {', '.join(TASKS)}")


def task_config(task: str, limit: int | None = None) -> dict[str, Any]:
    """An lm-eval task config dict for `task` that reads its examples through `pq_ao.data`. `limit` keeps the
    first `limit` examples, which are the ones lm-eval's own `limit` would score."""
    prompt = _prompt_config(task)
    split = _SPLIT[task]

    def dataset(**_: Any):  # lm-eval passes the task metadata as keyword arguments
        import datasets

        return datasets.DatasetDict({split: datasets.Dataset.from_list(data.load(task)[:limit])})

    return {
        "task": task,
        "custom_dataset": dataset,
        "output_type": "loglikelihood" if task == "lambada_openai" else "multiple_choice",
        ("test_split" if split == "test" else "validation_split"): split,
        "metadata": {"version": 1.0},
        **prompt,
    }


def build_task(task: str, limit: int | None = None):
    """The lm-eval `Task` for `task`, its examples loaded (`DatasetNotFoundError` if they are missing)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False).load(task_config(task, limit))["tasks"][task]


def paper_average(per_task: dict[str, dict[str, Any]]) -> tuple[float | None, float | None]:
    """(PrefixQuant's 5-task average: acc_norm for piqa/arc_easy/arc_challenge/hellaswag, acc for winogrande;
    the same with plain acc everywhere), both in [0, 1]; (None, None) unless all five are in `per_task`."""
    if not all(t in per_task for t in PAPER_TASKS):
        return None, None
    return (
        sum(per_task[t][PAPER_METRIC[t]] for t in PAPER_TASKS) / len(PAPER_TASKS),
        sum(per_task[t]["acc"] for t in PAPER_TASKS) / len(PAPER_TASKS),
    )


def evaluate(
    model,
    tokenizer,
    tasks: tuple[str, ...] | list[str] = TASKS,
    limit: int | None = None,
    batch_size: int = 16,
    bootstrap_iters: int = 1000,
    on_task: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Zero-shot eval of an in-memory HF causal LM, one `simple_evaluate` per task (`on_task(task, metrics)`
    is called after each, e.g. to save partial results of a long run).

    Returns `{"tasks": {task: {"acc", "acc_norm" (where lm-eval has it), "ppl" (lambada), their "_stderr"s,
    "n", "seconds"}}, "avg5", "avg5_acc" (see `paper_average`), "limit", "seconds"}`. Accuracies are in
    [0, 1].
    `bootstrap_iters` only matters for lambada's ppl stderr (accuracy stderrs are closed-form).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    for t in tasks:
        _prompt_config(t)  # unknown names fail before any loading
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    start = time.perf_counter()
    state = state_of(model)
    # A PrefixQuant prefix already ends with BOS (the model rejects a second one): the tokenizer must not add it.
    no_bos = {"add_bos_token": False} if state is not None and state.prefix_ids else {}
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **no_bos)
    per_task: dict[str, dict[str, Any]] = {}
    for t in tasks:
        t0 = time.perf_counter()
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=[task_config(t, limit)],
            num_fewshot=0,
            bootstrap_iters=bootstrap_iters,
            log_samples=False,
            task_manager=TaskManager(include_defaults=False),
        )
        per_task[t] = _task_metrics(out["results"][t], out["n-samples"][t]["effective"])
        per_task[t]["seconds"] = time.perf_counter() - t0
        if on_task is not None:
            on_task(t, per_task[t])
    avg5, avg5_acc = paper_average(per_task)
    return {
        "tasks": per_task,
        "avg5": avg5,
        "avg5_acc": avg5_acc,
        "limit": limit,
        "seconds": time.perf_counter() - start,
    }


def _task_metrics(raw: dict[str, Any], n: int) -> dict[str, Any]:
    """lm-eval's `"acc,none"`-style keys -> `acc`, `acc_stderr`, ..., with `perplexity` renamed `ppl`."""
    metrics: dict[str, Any] = {"n": n}
    for key, value in raw.items():
        name, _, filt = key.partition(",")
        if filt == "none":
            metrics[name.replace("perplexity", "ppl")] = value
    return metrics
