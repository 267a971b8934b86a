"""Where the project keeps files: committed data, and everything derived (converted models, token caches, the store,
unfinished runs) under `APTQ_CACHE_DIR` when that is set. Imports nothing heavy, so any module may use it."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "data"  # committed data (the embedded corpus)
CACHE_DIR = Path(os.environ.get("APTQ_CACHE_DIR", DATA_DIR))  # everything derived
