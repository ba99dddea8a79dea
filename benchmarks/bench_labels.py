"""Label operations (ffn/labels.py, cc3d + fastremap) against the code they replaced, on 250^3.

  .venv/bin/python benchmarks/bench_labels.py                  # training_sample2 ground truth
  .venv/bin/python benchmarks/bench_labels.py --repeats 5

Input: the body labels of ``../shared/data/fib25/training_sample2.h5:stack`` (250^3, int64, z,y,x;
path overridable by ``FFN_SHARED_DATA``), as uint64 (what ``storage.load_segmentation`` splits).

* ``split_disconnected_components`` (6-connected pieces numbered in raster order, every result
  read by ``load_segmentation`` goes through it): ``before`` = the previous implementation, kept
  here verbatim as the baseline (``scipy.ndimage.label`` on each object's bounding box, then a
  renumbering pass); ``now`` = ``ffn.inference.storage.split_disconnected_components``.
* ``clean_up`` with ``min_size`` 1000 (split, then clear small pieces, then the new -> old map).

The outputs of both are compared voxel for voxel. Reported: median wall seconds over
``--repeats`` runs and the speed-up, one JSON line per operation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import h5py
import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def split_before(labels: np.ndarray, connectivity: int = 1) -> np.ndarray:
  """The previous storage.split_disconnected_components (baseline)."""
  structure = ndimage.generate_binary_structure(labels.ndim, connectivity)
  ids = np.unique(labels)
  ids = ids[ids != 0]
  dense = np.searchsorted(ids, labels).astype(np.int64, copy=False) + 1
  dense[labels == 0] = 0
  pieces = np.zeros(labels.shape, np.int64)
  count = 0
  for k, box in enumerate(ndimage.find_objects(dense), start=1):
    if box is None:
      continue
    inside = dense[box] == k
    piece, n = ndimage.label(inside, structure)
    pieces[box][inside] = piece[inside] + count
    count += n
  del dense
  first = np.full(count + 1, pieces.size, np.int64)
  np.minimum.at(first, pieces.reshape(-1), np.arange(pieces.size, dtype=np.int64))
  lut = np.zeros(count + 1, np.int64)
  lut[1 + np.argsort(first[1:], kind="stable")] = np.arange(1, count + 1)
  out = lut[pieces]
  dtype = labels.dtype if np.can_cast(np.min_scalar_type(count), labels.dtype) else np.uint64
  return out.astype(dtype)


def clean_up_before(labels: np.ndarray, min_size: int) -> dict:
  """The previous storage.clean_up (split, np.unique-based dust removal, first-voxel map)."""
  original = labels.copy()
  labels[...] = split_before(labels)
  ids, sizes = np.unique(labels, return_counts=True)
  small = ids[(sizes < min_size) & (ids != 0)]
  if small.size:
    labels[np.isin(labels, small)] = 0
  flat = labels.reshape(-1)
  new_ids = np.unique(flat)
  first = np.full(new_ids.size, flat.size, np.int64)
  np.minimum.at(first, np.searchsorted(new_ids, flat), np.arange(flat.size, dtype=np.int64))
  return {int(n): int(o) for n, o in zip(new_ids, original.reshape(-1)[first])}


def _median_time(fn, repeats: int):
  times, out = [], None
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--data", default=os.path.join(
      os.environ.get("FFN_SHARED_DATA", str(ROOT.parent / "shared" / "data")),
      "fib25", "training_sample2.h5"))
  args = parser.parse_args()
  from ffn.inference import storage
  with h5py.File(args.data, "r") as f:
    gt = f["stack"][()].astype(np.uint64)

  t_before, before = _median_time(lambda: split_before(gt), args.repeats)
  t_now, now = _median_time(lambda: storage.split_disconnected_components(gt), args.repeats)
  assert before.dtype == now.dtype and np.array_equal(before, now)
  print(json.dumps({"op": "split_disconnected_components", "shape": list(gt.shape),
                    "pieces": int(now.max()), "before_s": round(t_before, 3),
                    "now_s": round(t_now, 3), "speedup": round(t_before / t_now, 1)}))

  def run(fn):
    labels = gt.copy()
    mapping = fn(labels)
    return labels, mapping
  t_before, (lb, mb) = _median_time(lambda: run(lambda x: clean_up_before(x, 1000)), args.repeats)
  t_now, (ln, mn) = _median_time(lambda: run(lambda x: storage.clean_up(x, True, 1000)),
                                 args.repeats)
  assert np.array_equal(lb, ln) and mb == mn
  print(json.dumps({"op": "clean_up(min_size=1000)", "objects": len(mn) - 1,
                    "before_s": round(t_before, 3), "now_s": round(t_now, 3),
                    "speedup": round(t_before / t_now, 1)}))


if __name__ == "__main__":
  main()
