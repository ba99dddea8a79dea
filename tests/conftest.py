"""Shared test fixtures: the FIB-25 sample shipped in the repository, and the larger shared data.

``sample_fib25`` is ``sample_data/fib25`` (always in a checkout): ``training_sample2_crop.h5``, a
150^3 crop (x,y,z = 50..199 of training_sample2; datasets ``raw`` uint8 and ``stack`` int64, z,y,x)
and Google's pretrained ``model/model.ckpt-27465036``. Tests use it unless they truly need more.

``fib25_dir`` is the whole 250^3 training_sample2 in ``../shared/data/fib25`` beside the checkout, or
in ``$FFN_SHARED_DATA/fib25`` when that variable is set (point it at an empty folder to check what a
fresh clone runs). A test that needs something absent fails when the env var CI is set, and skips
otherwise with a one-line reason (:func:`missing`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FFN_SHARED_DATA") or REPO_ROOT.parent / "shared" / "data")
FIB25 = SHARED_DATA / "fib25"
SAMPLE_FIB25 = REPO_ROOT / "sample_data" / "fib25"
SAMPLE_CROP = SAMPLE_FIB25 / "training_sample2_crop.h5"
SAMPLE_CKPT = SAMPLE_FIB25 / "model" / "model.ckpt-27465036"
SAMPLE_OFFSET_XYZ = (50, 50, 50)  # the crop's origin in training_sample2 (x,y,z voxels)


def missing(reason: str) -> NoReturn:
  """Ends a test whose requirement ``reason`` (one line) is absent: fails under CI, else skips."""
  if os.environ.get("CI"):
    pytest.fail(f"{reason} (CI is set: tests may not skip)", pytrace=False)
  pytest.skip(reason)


@pytest.fixture(scope="session")
def sample_fib25() -> Path:
  """``sample_data/fib25``: the shipped 150^3 crop and model (fails if the checkout lacks them)."""
  for path in (SAMPLE_CROP, Path(f"{SAMPLE_CKPT}.index")):
    if not path.exists():
      pytest.fail(f"{path} is missing from the checkout", pytrace=False)
  return SAMPLE_FIB25


@pytest.fixture(scope="session")
def fib25_dir() -> Path:
  """Directory with the whole training_sample2.h5 and model/ (see :func:`missing` when absent)."""
  if not (FIB25 / "training_sample2.h5").exists():
    missing(f"needs the whole 250^3 training_sample2 at {FIB25} (set FFN_SHARED_DATA)")
  return FIB25
