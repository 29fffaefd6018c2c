"""A plain-text table of eval results: one row per task, accuracies in percent."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# (metric key, column title, format); acc and acc_norm are fractions printed as percent.
_COLUMNS = (("ppl", "ppl", "{:.4f}"), ("acc", "acc %", "{:.2f}"), ("acc_norm", "acc_norm %", "{:.2f}"),
            ("n", "n", "{}"), ("seconds", "s", "{:.0f}"))  # fmt: skip
_PERCENT = {"acc", "acc_norm"}


def _cell(key: str, value: Any) -> str:
    if value is None:
        return ""
    fmt = next(f for k, _, f in _COLUMNS if k == key)
    return fmt.format(100 * value if key in _PERCENT else value)


def format_table(
    results: Mapping[str, Mapping[str, Any]], summary: Mapping[str, float | None] | None = None
) -> str:
    """`results[task][metric]` (the `results` of a `pq-ao eval` JSON) as an aligned table. `summary` fractions
    (e.g. `avg5`) become rows of their own, in the acc column; None values and missing metrics print blank."""
    rows = [["task", *(title for _, title, _ in _COLUMNS)]]
    rows += [[task, *(_cell(k, metrics.get(k)) for k, _, _ in _COLUMNS)] for task, metrics in results.items()]
    rows += [
        [name, "", _cell("acc", value), "", "", ""]
        for name, value in (summary or {}).items()
        if value is not None
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
