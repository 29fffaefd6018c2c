"""Import torchao without its start-up noise (a workaround, isolated here; `tests/test_quiet_import.py`).

torchao 0.18 on torch 2.13 prints, at every import, a warning per prebuilt C++ extension it cannot load
("Failed to load .../_C_mxfp8...so", "_C_cutlass_90a"; pq_ao uses none of them: its kernels are its own) and torch
logs two deprecation warnings when torchao registers its Enum classes as pytree constants. Every `pq-ao` command
would print them first. This module imports the parts of torchao that pq_ao uses with exactly those two loggers
held at ERROR (and SyntaxWarnings of torchao's sources, which Python 3.12 shows when no bytecode is cached), then
restores them: messages logged later, or by anything else, are untouched.

Remove it when torchao stops logging them (a torchao whose extensions match the installed torch, and that no longer
registers Enums with `register_constant`): the test then still passes without it.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

_NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def quiet_torchao_import():
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=SyntaxWarning, module=r"torchao(\.|$)")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


with quiet_torchao_import():  # every torchao module pq_ao imports
    import torchao.core.config  # noqa: F401
    import torchao.prototype.safetensors.safetensors_utils  # noqa: F401
    import torchao.quantization  # noqa: F401
    import torchao.quantization.transform_module  # noqa: F401
    import torchao.utils  # noqa: F401
