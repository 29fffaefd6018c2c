"""`pq_ao/runtime.py` on its own (the package round trips are in test_export.py): it imports without pq_ao, and
what a user gets wrong is named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import pq_ao

RUNTIME = Path(pq_ao.__file__).parent / "runtime.py"


def test_the_runtime_is_a_standalone_file():
    """Loaded as a plain file (no pq_ao import), it preloads a libstdc++ and exposes the loader."""
    code = (f"import importlib.util, sys; spec = importlib.util.spec_from_file_location('rt', {str(RUNTIME)!r}); "
            "rt = importlib.util.module_from_spec(spec); spec.loader.exec_module(rt); "
            "assert not any(k.split('.')[0] == 'pq_ao' for k in sys.modules); "
            "p = rt.preload_libstdcxx(); assert p is None or 'stdc++' in p; assert rt.preload_libstdcxx() == p; "
            "print(callable(rt.load))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr


def test_a_missing_or_foreign_file_is_named(tmp_path):
    from pq_ao import runtime

    with pytest.raises(FileNotFoundError):
        runtime.load(tmp_path / "nope.pt2")
    bad = tmp_path / "bad.pt2"
    bad.write_text("not a zip")
    with pytest.raises(Exception, match="zip"):
        runtime.load(bad)
