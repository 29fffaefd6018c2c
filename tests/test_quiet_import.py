"""Importing pq_ao, or running a `pq-ao` command, prints nothing but the command's own output
(`pq_ao/_torchao_import.py` holds back torchao's start-up warnings)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_prints_nothing():
    proc = _run("import pq_ao")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == "", proc.stdout + proc.stderr


def test_cli_prints_only_its_own_output():
    proc = _run("import sys; sys.argv = ['pq-ao', '--help']; from pq_ao.cli import main; main()")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    assert proc.stdout.startswith("usage: pq-ao"), proc.stdout[:300]


def test_later_warnings_are_not_silenced():
    """The loggers are held back only while torchao is imported."""
    proc = _run("import logging, pq_ao; logging.getLogger('torchao').warning('still here')")
    assert "still here" in proc.stderr


@pytest.mark.parametrize("name", ["torchao", "torch.utils._pytree"])
def test_logger_levels_restored(name):
    import logging

    import pq_ao  # noqa: F401

    assert logging.getLogger(name).level != logging.ERROR
