"""Shared entry-point plumbing for the jobs: repo on sys.path, logging, one-line errors."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python jobs/x.py` from a checkout or a Ray working_dir
    sys.path.insert(0, str(REPO))

# Ray Data's progress bars are noise in logs and CI; keep them for humans at a terminal.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0" if sys.stdout.isatty() else "1")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def quiet_libraries() -> None:
    """faiss logs each CPU-feature build it could not load; MLflow draws download progress bars."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def fail(message: str, code: int = 2) -> int:
    """Print a one-line error to stderr and return the exit code."""
    print(f"error: {message}", file=sys.stderr)
    return code
