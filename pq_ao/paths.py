"""Where the project's shared assets live: `$PQ_AO_SHARED_DIR`, else a `shared/` beside the repo checkout."""

from __future__ import annotations

import os
from pathlib import Path

SHARED_ENV = "PQ_AO_SHARED_DIR"


def shared_dir() -> Path | None:
    """The shared assets folder (models/, data/), or None when there is none (an installed package, say)."""
    env = os.environ.get(SHARED_ENV)
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[1]  # .../<checkout>/pq_ao/paths.py -> <checkout>
    for cand in (repo.parent / "shared", repo / "shared", Path.cwd().parent / "shared"):
        if cand.is_dir():
            return cand
    return None
