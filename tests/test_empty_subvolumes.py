"""Subvolumes with nothing to segment (a constant image: padding beyond the tissue; or every voxel
masked) get an empty result at once: no model load, no seed policy, no network call."""

from __future__ import annotations

import time

import h5py
import numpy as np

from ffn.cli import main
from ffn.inference import storage

MODEL_ARGS = r'"{\"depth\": 12, \"fov_size\": [33, 33, 33], \"deltas\": [8, 8, 8]}"'


def request(tmp_path, image: str, checkpoint: str, extra: str = "") -> str:
  text = (f'image {{ hdf5: "{image}" }} image_mean: 128 image_stddev: 33 '
          f'seed_policy: "PolicyPeaks" model_checkpoint_path: "{checkpoint}" '
          f'model_name: "convstack_3d.ConvStack3DFFNModel" model_args: {MODEL_ARGS} '
          f'segmentation_output_dir: "{tmp_path / "out"}" '
          'inference_options { init_activation: 0.95 pad_value: 0.05 move_threshold: 0.9 '
          f'segment_threshold: 0.6 min_segment_size: 1000 }} {extra}')
  tmp_path.mkdir(parents=True, exist_ok=True)
  path = tmp_path / "req.pbtxt"
  path.write_text(text)
  return str(path)


def test_constant_chunks_are_saved_empty_without_loading_the_model(tmp_path, sample_fib25):
  """A volume whose upper half (z 40..79) is blank padding: its chunk is saved empty, with its
  counter, and the runner never loads the model; the chunk with tissue then loads it and runs
  the seed policy; a fully masked chunk is also skipped."""
  from ffn.axes import BoundingBox
  from ffn.inference.request import load_request
  from ffn.inference.runner import Runner
  with h5py.File(sample_fib25 / "training_sample2_crop.h5") as f:
    tissue = f["raw"][50:90, 50:90, 50:90]
  with h5py.File(tmp_path / "img.h5", "w") as f:
    f["raw"] = np.concatenate([tissue, np.zeros((40, 40, 40), np.uint8)], axis=0)
  checkpoint = sample_fib25 / "model" / "model.ckpt-27465036"
  runner = Runner(load_request(request(tmp_path, f"{tmp_path / 'img.h5'}:raw", str(checkpoint))),
                  compute_dtype="bfloat16")
  started = time.monotonic()
  runner.run(BoundingBox((0, 0, 40), (40, 40, 40)))
  assert time.monotonic() - started < 30
  assert runner.predict is None and "load-model" not in runner.counters.dumps()
  labels, _ = storage.load_segmentation(str(tmp_path / "out"), (40, 0, 0))
  assert labels.shape == (40, 40, 40) and not labels.any()
  with np.load(storage.segmentation_path(str(tmp_path / "out"), (40, 0, 0)), allow_pickle=True) as d:
    assert "empty-subvolumes" in str(d["counters"])
  runner.run(BoundingBox((0, 0, 0), (40, 40, 40)))
  assert runner.predict is not None
  with np.load(storage.segmentation_path(str(tmp_path / "out"), (0, 0, 0)), allow_pickle=True) as d:
    counters = str(d["counters"])
  assert "seed-policy" in counters  # (the runner's counters, cumulative as google saves them)
  # Every voxel masked (a mask expression true everywhere): skipped the same way.
  masked = Runner(load_request(request(
      tmp_path / "m", f"{tmp_path / 'img.h5'}:raw", str(checkpoint),
      'masks { image { channels { channel: 0 min_value: -1 max_value: 1000 } } }')))
  masked.run(BoundingBox((0, 0, 0), (40, 40, 40)))
  assert masked.predict is None
  labels, _ = storage.load_segmentation(str(tmp_path / "m" / "out"), (0, 0, 0))
  assert not labels.any()
