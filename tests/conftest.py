"""Shared test fixtures: where the real FIB-25 data lives (``../shared/data`` beside the checkout)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
FIB25 = SHARED_DATA / "fib25"


@pytest.fixture(scope="session")
def fib25_dir() -> Path:
  """Directory with training_sample2.h5 and model/ (skips the test when the data are absent)."""
  if not (FIB25 / "training_sample2.h5").exists():
    pytest.skip(f"real FIB-25 data not found at {FIB25}")
  return FIB25
