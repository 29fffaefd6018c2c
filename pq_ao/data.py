"""Named evaluation and calibration datasets, and the calibration sampler.

Resolution order for a dataset: `$PQ_AO_DATA_DIR`, then `shared_dir()/data`, then the HF hub through
`datasets` (skipped when `HF_HUB_OFFLINE` or `HF_DATASETS_OFFLINE` is set). Local files use the layout of
`shared/data` (see its SOURCES.md); the hub ids are the ones lm-eval's task configs load: the same examples.

What `load(name)` returns (plain Python, no `datasets` objects):
- `wikitext2` / `wikitext2_valid`: one string, `"\\n\\n".join` of the HF rows of the test / validation split
  (GPTQ's and lm-eval's string; for the test split 1,294,336 characters).
- `c4`, `wiki`: calibration text, a list of documents (strings).
- `piqa`, `arc_easy`, `arc_challenge`, `hellaswag`, `winogrande`, `lambada_openai`: the split lm-eval scores,
  a list of dict examples in the HF dataset's schema (the fields lm-eval's prompt templates read).
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pq_ao.paths import shared_dir

DATA_ENV = "PQ_AO_DATA_DIR"
OFFLINE_ENVS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
CALIBRATION_DATASETS = ("c4", "wiki")


class DatasetNotFoundError(FileNotFoundError):
    """A named dataset is neither on disk nor reachable on the hub."""


@dataclass(frozen=True)
class _Source:
    description: str
    files: tuple[str, ...]  # paths relative to a data dir; all must exist for the local copy to be used
    read_local: Callable[[list[Path]], Any]  # called with `files` resolved under the data dir
    hub: str  # shown in errors
    read_hub: Callable[[], Any]


def _jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _wikitext_rows(path: Path) -> list[str]:
    # HF's wikitext rows: the file's lines split on "\n" only, each keeping its "\n"; blank lines become "".
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    rows = [line + "\n" for line in lines[:-1]]
    if lines[-1]:
        rows.append(lines[-1])
    return ["" if not r.strip() else r for r in rows]


def _wikitext_local(files: list[Path]) -> str:
    return "\n\n".join(_wikitext_rows(files[0]))


def _hub(path: str, name: str | None, split: str, **kwargs: Any):
    import datasets

    return datasets.load_dataset(path, name, split=split, **kwargs)


def _wiki_docs(files: list[Path]) -> list[str]:
    text = files[0].read_text(encoding="utf-8")
    return [d.strip() for d in re.findall(r"<doc [^>]*>(.*?)</doc>", text, flags=re.S) if d.strip()]


def _c4_docs(files: list[Path]) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(files[0], columns=["text"]).column("text").to_pylist()


def _piqa(files: list[Path]) -> list[dict]:
    docs = _jsonl(files[0])
    labels = [int(x) for x in files[1].read_text().split()]
    if len(labels) != len(docs):
        raise ValueError(f"{files[1]} has {len(labels)} labels for {len(docs)} examples in {files[0]}")
    return [
        {"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": y} for d, y in zip(docs, labels)
    ]


def _arc(files: list[Path]) -> list[dict]:
    # AI2's nested layout -> HF ai2_arc's: question is the stem, choices is {"text": [...], "label": [...]}.
    return [
        {
            "id": d["id"],
            "question": d["question"]["stem"],
            "choices": {
                "text": [c["text"] for c in d["question"]["choices"]],
                "label": [c["label"] for c in d["question"]["choices"]],
            },
            "answerKey": d["answerKey"],
        }
        for d in _jsonl(files[0])
    ]


def _hellaswag(files: list[Path]) -> list[dict]:
    # HF Rowan/hellaswag stores labels as strings
    return [{**d, "label": str(d["label"])} for d in _jsonl(files[0])]


def _first_jsonl(files: list[Path]) -> list[dict]:
    return _jsonl(files[0])


def _hub_rows(path: str, name: str | None, split: str) -> Callable[[], list[dict]]:
    return lambda: _hub(path, name, split).to_list()


def _hub_text_join(path: str, name: str, split: str) -> Callable[[], str]:
    return lambda: "\n\n".join(_hub(path, name, split)["text"])


def _arc_source(subset: str) -> _Source:
    return _Source(
        f"AI2 ARC-{subset} test (lm-eval arc_{subset.lower()})",
        (f"arc_{subset.lower()}/ARC-{subset}-Test.jsonl",),
        _arc,
        f"allenai/ai2_arc ARC-{subset} test",
        _hub_rows("allenai/ai2_arc", f"ARC-{subset}", "test"),
    )


_C4_HUB_FILE = "en/c4-validation.00000-of-00008.json.gz"

SOURCES: dict[str, _Source] = {
    "wikitext2": _Source(
        "WikiText-2 raw test, one string",
        ("wikitext2/wiki.test.raw",),
        _wikitext_local,
        "Salesforce/wikitext wikitext-2-raw-v1 test",
        _hub_text_join("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
    ),
    "wikitext2_valid": _Source(
        "WikiText-2 raw validation, one string",
        ("wikitext2/wiki.valid.raw",),
        _wikitext_local,
        "Salesforce/wikitext wikitext-2-raw-v1 validation",
        _hub_text_join("Salesforce/wikitext", "wikitext-2-raw-v1", "validation"),
    ),
    "c4": _Source(
        "C4 validation documents (calibration)",
        ("calibration/c4_validation_2k.parquet",),
        _c4_docs,
        f"allenai/c4 {_C4_HUB_FILE}",
        lambda: _hub("allenai/c4", None, "validation", data_files={"validation": _C4_HUB_FILE})["text"],
    ),
    "wiki": _Source(
        "Wikipedia articles (calibration); from the hub: WikiText-2 raw train as one document",
        ("calibration/wiki.utf8",),
        _wiki_docs,
        "Salesforce/wikitext wikitext-2-raw-v1 train",
        lambda: [_hub_text_join("Salesforce/wikitext", "wikitext-2-raw-v1", "train")()],
    ),
    "piqa": _Source(
        "PIQA validation",
        ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
        _piqa,
        "baber/piqa validation",
        _hub_rows("baber/piqa", None, "validation"),
    ),
    "arc_easy": _arc_source("Easy"),
    "arc_challenge": _arc_source("Challenge"),
    "hellaswag": _Source(
        "HellaSwag validation",
        ("hellaswag/hellaswag_val.jsonl",),
        _hellaswag,
        "Rowan/hellaswag validation",
        _hub_rows("Rowan/hellaswag", None, "validation"),
    ),
    "winogrande": _Source(
        "WinoGrande (xl) validation",
        ("winogrande/dev.jsonl",),
        _first_jsonl,
        "allenai/winogrande winogrande_xl validation",
        _hub_rows("allenai/winogrande", "winogrande_xl", "validation"),
    ),
    "lambada_openai": _Source(
        "LAMBADA (OpenAI's detokenized) test",
        ("lambada_openai/lambada_test.jsonl",),
        _first_jsonl,
        "EleutherAI/lambada_openai default test",
        _hub_rows("EleutherAI/lambada_openai", "default", "test"),
    ),
}


def known_datasets() -> str:
    return ", ".join(f"{k} ({s.description})" for k, s in SOURCES.items())


def _source(name: str) -> _Source:
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {known_datasets()}")
    return SOURCES[name]


def data_dirs() -> list[Path]:
    """The local data folders searched, in order: `$PQ_AO_DATA_DIR`, then `shared_dir()/data`."""
    dirs = []
    if os.environ.get(DATA_ENV):
        dirs.append(Path(os.environ[DATA_ENV]))
    shared = shared_dir()
    if shared is not None:
        dirs.append(shared / "data")
    return dirs


def hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_ENVS)


def local_files(name: str) -> list[Path] | None:
    """The local files of `name` in the first data folder holding all of them, or None."""
    src = _source(name)
    for d in data_dirs():
        paths = [d / f for f in src.files]
        if all(p.is_file() for p in paths):
            return paths
    return None


def _looked(name: str) -> str:
    return f"looked for {list(_source(name).files)} in {[str(d) for d in data_dirs()] or 'no data folder'}"


def check_available(name: str) -> None:
    """Fail early (`DatasetNotFoundError`) when `name` is not on disk and the hub is off; else a no-op."""
    if local_files(name) is None and hub_offline():
        raise DatasetNotFoundError(
            f"dataset {name!r} not found locally ({_looked(name)}) and the hub is off "
            f"({' / '.join(OFFLINE_ENVS)} set). Put the files under ${DATA_ENV} or unset the offline "
            "variables."
        )


def load(name: str) -> Any:
    """Load a named dataset (the module docstring says what each returns). Raises `ValueError` for an
    unknown name and `DatasetNotFoundError` when it is not on disk and the hub is off or fails."""
    src = _source(name)
    paths = local_files(name)
    if paths is not None:
        return src.read_local(paths)
    check_available(name)
    try:
        return src.read_hub()
    except (
        Exception
    ) as e:  # datasets raises many types: ConnectionError, FileNotFoundError, HfHubHTTPError...
        raise DatasetNotFoundError(
            f"dataset {name!r} not found locally ({_looked(name)}) and loading {src.hub} from the HF hub "
            f"failed: {type(e).__name__}: {e}"
        ) from e


def calibration_tokens(
    tokenizer, name: str = "c4", n: int = 64, seqlen: int = 512, seed: int = 0
) -> torch.LongTensor:
    """`n` random, non-overlapping windows of `seqlen` tokens of calibration text: a `[n, seqlen]` LongTensor.

    The documents are shuffled with `seed`, tokenized one by one without special tokens
    (`add_special_tokens=False`) and joined by the tokens of "\\n\\n" until the stream holds twice the
    tokens needed (or the text runs out). The window starts are uniform random among non-overlapping
    placements in that stream. Same seed, same tokens.
    """
    if name not in CALIBRATION_DATASETS:
        raise ValueError(f"{name!r} is not calibration text; use one of {CALIBRATION_DATASETS}")
    if n <= 0 or seqlen <= 0:
        raise ValueError(f"n and seqlen must be positive, got n={n}, seqlen={seqlen}")
    docs = list(load(name))
    rng = random.Random(seed)
    rng.shuffle(docs)
    need = n * seqlen
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for i in range(0, len(docs), 64):
        for ids in tokenizer(docs[i : i + 64], add_special_tokens=False)["input_ids"]:
            stream += ids + sep
        if len(stream) >= 2 * need:
            break
    if len(stream) < need:
        raise ValueError(
            f"calibration text {name!r} has {len(stream)} tokens, "
            f"fewer than n * seqlen = {n} * {seqlen} = {need}"
        )
    slack = len(stream) - need
    offsets = sorted(rng.randint(0, slack) for _ in range(n))
    tokens = torch.tensor(stream, dtype=torch.long)
    return torch.stack([tokens[o + i * seqlen : o + (i + 1) * seqlen] for i, o in enumerate(offsets)])
