"""Golden values for the segmentation scores on hand-made label arrays."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import h5py
import numpy as np
import pytest

from ffn.inference import storage
from ffn.metrics import evaluate
from conftest import REPO_ROOT


def test_identical_is_zero():
  gt = np.repeat(np.arange(1, 5), 25).reshape(4, 5, 5)
  s = evaluate(gt * 7, gt)  # label values differ, partition identical
  assert s["vi_split"] == pytest.approx(0.0, abs=1e-12)
  assert s["vi_merge"] == pytest.approx(0.0, abs=1e-12)
  assert s["adjusted_rand_error"] == pytest.approx(0.0, abs=1e-12)
  assert s["segments"] == 4 and s["groundtruth_objects"] == 4


def test_one_split_is_log2():
  gt = np.ones((2, 4, 4), np.int64)
  seg = np.ones_like(gt)
  seg[1] = 2  # one object cut into two equal halves
  s = evaluate(seg, gt)
  assert s["vi_split"] == pytest.approx(math.log(2))
  assert s["vi_merge"] == pytest.approx(0.0, abs=1e-12)


def test_one_merge_is_log2_and_ari():
  gt = np.ones((2, 2, 2), np.int64)
  gt[1] = 2
  seg = np.ones_like(gt)
  s = evaluate(seg, gt)
  assert s["vi_merge"] == pytest.approx(math.log(2))
  assert s["vi_split"] == pytest.approx(0.0, abs=1e-12)
  # 8 voxels, two true objects of 4: a = C(8,2)=28 pairs in seg, b = 2*C(4,2)=12, index = 12.
  expected = 28 * 12 / 28
  ari = (12 - expected) / ((28 + 12) / 2 - expected)
  assert s["adjusted_rand_error"] == pytest.approx(1 - ari)
  assert s["adjusted_rand_error"] == pytest.approx(1.0)


def test_groundtruth_background_ignored_unsegmented_counts_as_label():
  gt = np.array([[[1, 1, 1, 1, 0, 0]]])
  seg = np.array([[[5, 5, 0, 0, 9, 3]]])  # the gt-0 voxels' labels must not matter
  s = evaluate(seg, gt)
  assert s["vi_split"] == pytest.approx(math.log(2))  # {5,5} and unsegmented {0,0}
  assert s["fraction_unsegmented"] == pytest.approx(2 / 6)
  assert s["voxels_scored"] == 4


def test_hand_computed_vi():
  gt = np.array([1, 1, 1, 2, 2, 2]).reshape(1, 1, 6)
  seg = np.array([1, 1, 2, 2, 2, 2]).reshape(1, 1, 6)
  s = evaluate(seg, gt)
  # H(seg|gt): gt1 -> {2/3,1/3}, gt2 -> pure;  H(gt|seg): seg2 -> {1/4, 3/4}, seg1 pure.
  h = lambda ps: -sum(p * math.log(p) for p in ps)
  assert s["vi_split"] == pytest.approx(0.5 * h([2 / 3, 1 / 3]))
  assert s["vi_merge"] == pytest.approx(4 / 6 * h([1 / 4, 3 / 4]))


def test_cli_npz_uses_corner_from_name(tmp_path):
  gt = np.zeros((6, 6, 6), np.int64)
  gt[:, :, 3:] = 1
  gt[:, :, :3] = 2
  gt_path = tmp_path / "gt.h5"
  with h5py.File(gt_path, "w") as f:
    f["stack"] = gt
  seg = np.ones((2, 3, 4), np.uint8)  # box start x=2,y=1,z=3 size x=4,y=3,z=2 -> covers x 2..5
  out = tmp_path / "res" / "2" / "1" / "seg-2_1_3.npz"
  out.parent.mkdir(parents=True)
  storage.save_subvolume(seg, {}, str(out))
  js = tmp_path / "s.json"
  proc = subprocess.run([sys.executable, "-m", "ffn.cli", "evaluate", "--segmentation", str(out),
                         "--groundtruth", f"{gt_path}:stack", "--output_json", str(js)],
                        cwd=REPO_ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  scores = json.loads(js.read_text())
  # x=2 is object 2 (1/4 of the box), x=3..5 object 1: one segment merges them.
  assert scores["vi_merge"] == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
  assert scores["bounding_box"] == {"start": [2, 1, 3], "size": [4, 3, 2]}


def test_cli_bad_groundtruth_exits_2(tmp_path):
  seg_path = tmp_path / "seg.h5"
  with h5py.File(seg_path, "w") as f:
    f["seg"] = np.zeros((2, 2, 2), np.uint8)
  proc = subprocess.run([sys.executable, "-m", "ffn.cli", "evaluate", "--segmentation",
                         f"{seg_path}:seg", "--groundtruth", f"{tmp_path}/missing.h5:stack"],
                        cwd=REPO_ROOT, capture_output=True, text=True)
  assert proc.returncode == 2
  assert "missing.h5" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_adapted_rand_error_hand_computed():
  gt = np.array([1, 1, 1, 1, 2, 2]).reshape(1, 1, 6)
  seg = np.array([1, 1, 2, 2, 2, 2]).reshape(1, 1, 6)
  s = evaluate(seg, gt)
  overlap = 2**2 + 2**2 + 2**2  # n_ij: (1,1)=2, (2,1)=2, (2,2)=2
  p = overlap / (2**2 + 4**2)
  r = overlap / (4**2 + 2**2)
  assert s["adapted_rand_error"] == pytest.approx(1 - 2 * p * r / (p + r))
  assert evaluate(gt, gt)["adapted_rand_error"] == pytest.approx(0.0, abs=1e-12)
