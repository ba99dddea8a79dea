"""Result files: google/ffn layout, keys and dtypes; loading; probability quantisation."""

from __future__ import annotations

import numpy as np
import pytest

from ffn.errors import FFNError
from ffn.inference import storage


def test_paths_follow_google_layout():
  corner = (30, 20, 10)  # z,y,x
  assert storage.segmentation_path("out", corner) == "out/10/20/seg-10_20_30.npz"
  assert storage.checkpoint_path("out", corner) == "out/10/20/seg-10_20_30.cpoint"
  assert storage.object_prob_path("out", corner) == "out/10/20/seg-10_20_30.prob"
  assert storage.corner_from_path("out/10/20/seg-10_20_30.npz") == corner


def test_quantize_roundtrip():
  p = np.array([0.0, 0.3, 0.5, 0.999, 1.0, np.nan])
  q = storage.quantize_probability(p)
  assert q.dtype == np.uint8 and q[-1] == 0 and np.all(q[:-1] >= 1)
  back = storage.dequantize_probability(q)
  assert np.isnan(back[-1])
  np.testing.assert_allclose(back[:-1], p[:-1], atol=2 / 255)  # google's 254 bins, /255 decoding


def test_save_matches_google_keys_and_dtypes(tmp_path):
  labels = np.zeros((4, 5, 6), np.int32)
  labels[1:3, 1:3, 1:3] = 300  # > 255: needs uint16
  origins = {300: storage.OriginInfo((2, 2, 2), 5, 1.5)}
  path = storage.segmentation_path(str(tmp_path), (0, 0, 0))
  storage.save_subvolume(labels, origins, path, request=b"x", counters="{}",
                         overlaps={300: np.zeros((2, 0))})
  with np.load(path, allow_pickle=True) as d:
    assert set(d.files) == {"segmentation", "origins", "request", "counters", "overlaps"}
    assert d["segmentation"].dtype == np.uint16
    assert d["origins"].item()[300].iters == 5
  seg, orig = storage.load_segmentation(str(tmp_path), (0, 0, 0), split_cc=False)
  assert seg.dtype == np.uint64 and int(seg.max()) == 300 and orig[300].start_zyx == (2, 2, 2)
  seg, orig = storage.load_segmentation(str(tmp_path), (0, 0, 0))  # google's default: split_cc
  assert int(seg.max()) == 1 and orig[1].start_zyx == (2, 2, 2)
  assert not [p for p in tmp_path.rglob("*.tmp")]  # atomic write leaves no temp files


def test_load_google_legacy_layout_threshold_and_min_size(tmp_path):
  # Written exactly as google/ffn's save_subvolume + prob file do (flat legacy layout).
  seg = np.zeros((3, 4, 4), np.uint8)
  seg[0] = 1
  seg[1:, 2:] = 1  # 32 voxels
  seg[1:, :2] = 2  # 16 voxels
  prob = np.where(seg > 0, 0.9, np.nan)
  prob[0, 0, 0] = 0.2
  np.savez_compressed(tmp_path / "seg-0_0_0.npz", segmentation=seg,
                      origins={1: storage.OriginInfo((0, 1, 1), 3, 0.1)})
  with open(tmp_path / "seg-0_0_0.prob", "wb") as f:
    np.savez_compressed(f, qprob=storage.quantize_probability(prob))
  out, origins = storage.load_segmentation(str(tmp_path), (0, 0, 0), threshold=0.5)
  assert out[0, 0, 0] == 0 and out[0, 0, 1] == 1
  assert storage.existing_corners(str(tmp_path)) == [(0, 0, 0)]
  out, origins = storage.load_segmentation(str(tmp_path), (0, 0, 0), min_size=17)
  assert 2 not in set(np.unique(out)) and 1 in set(np.unique(out))  # object 2 has 2*2*4 = 16 voxels
  assert 1 in origins

def test_missing_result_is_ffn_error(tmp_path):
  with pytest.raises(FFNError, match="no segmentation"):
    storage.load_segmentation(str(tmp_path), (0, 0, 0))
