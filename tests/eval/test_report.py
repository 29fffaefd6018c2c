from pq_ao.eval.report import format_table


def test_table_rows_columns_and_percentages():
    table = format_table(
        {
            "wikitext2": {"ppl": 21.6136, "n_windows": 148, "seconds": 6.6},
            "piqa": {"acc": 0.6474, "acc_norm": 0.648, "n": 1838, "seconds": 25.3},
            "winogrande": {"acc": 0.5059, "n": 1267},
        },
        {"avg5": 0.46014, "avg5_acc": None},
    )
    lines = table.splitlines()
    assert lines[0].split() == ["task", "ppl", "acc", "%", "acc_norm", "%", "n", "s"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split() == ["wikitext2", "21.6136", "7"]
    assert lines[3].split() == ["piqa", "64.74", "64.80", "1838", "25"]
    assert lines[4].split() == ["winogrande", "50.59", "1267"]  # no acc_norm, no time: blank cells
    assert lines[5].split() == ["avg5", "46.01"]
    assert len(lines) == 6  # None summaries are left out
    assert len({len(line.rstrip()) for line in lines[:2]}) == 1  # header and rule line up
