"""Inference with Google's real fib25 checkpoint on small boxes of the shipped training_sample2 crop.

Includes the kill-and-resume test: a run stopped by SIGTERM after its first checkpoint, then
rerun, must give exactly the segmentation of an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO_ROOT
from ffn.inference import storage
from ffn.inference.request import parse_request

# google/ffn's benchmark box starts at x,y,z 75 of training_sample2: 25 in the shipped crop.
BOX = "start {{ x: 25 y: 25 z: 25 }} size {{ x: {n} y: {n} z: {n} }}"


def request_text(sample, out, interval=0) -> str:
  """The inference request of google's training_sample2 config on the crop in ``sample``."""
  return f"""
image {{ hdf5: "{sample}/training_sample2_crop.h5:raw" }}
image_mean: 128
image_stddev: 33
checkpoint_interval: {interval}
seed_policy: "PolicyPeaks"
model_checkpoint_path: "{sample}/model/model.ckpt-27465036"
model_name: "convstack_3d.ConvStack3DFFNModel"
model_args: "{{\\"depth\\": 12, \\"fov_size\\": [33, 33, 33], \\"deltas\\": [8, 8, 8]}}"
segmentation_output_dir: "{out}"
inference_options {{
  init_activation: 0.95 pad_value: 0.05 move_threshold: 0.9
  min_boundary_dist {{ x: 1 y: 1 z: 1 }} segment_threshold: 0.6 min_segment_size: 1000
}}
"""


def run_cli(req_path, box, **kwargs) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "run_inference.py", f"--inference_request={req_path}",
                           f"--bounding_box={box}"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **kwargs)


def test_real_model_50_cube(sample_fib25, tmp_path):
  from ffn.inference.runner import Runner
  from ffn.inference.request import parse_bounding_box
  from ffn.io.volumes import read_volume
  runner = Runner(parse_request(request_text(sample_fib25, tmp_path)))
  box = parse_bounding_box(BOX.format(n=50))
  path = runner.run(box)
  assert path == str(tmp_path / "25" / "25" / "seg-25_25_25.npz")
  seg, origins = storage.load_segmentation_file(path)
  assert seg.shape == (50, 50, 50)
  ids = set(np.unique(seg).tolist()) - {0}
  assert len(ids) >= 2 and ids == set(origins)
  gt = read_volume(f"{sample_fib25}/training_sample2_crop.h5:stack", box)
  for i in ids:
    assert np.sum(seg == i) >= 1000  # min_segment_size
    _, counts = np.unique(gt[seg == i], return_counts=True)
    assert counts.max() / counts.sum() > 0.6  # each object lies mostly in one true body
  assert os.path.exists(str(tmp_path / "25" / "25" / "seg-25_25_25.prob"))
  assert not os.path.exists(str(tmp_path / "25" / "25" / "seg-25_25_25.cpoint"))
  with np.load(path, allow_pickle=True) as data:
    from ffn.inference import inference_pb2
    saved = inference_pb2.InferenceRequest.FromString(data["request"].item())
    assert saved.seed_policy == "PolicyPeaks"
  assert runner.counters["inference-calls"] >= len(ids)


@pytest.mark.slow
def test_sigterm_then_resume_matches_uninterrupted(sample_fib25, tmp_path):
  box = BOX.format(n=64)
  ref_req = tmp_path / "ref.pbtxt"
  ref_req.write_text(request_text(sample_fib25, tmp_path / "ref"))
  killed_req = tmp_path / "killed.pbtxt"
  killed_req.write_text(request_text(sample_fib25, tmp_path / "killed", interval=1))
  cpoint = tmp_path / "killed" / "25" / "25" / "seg-25_25_25.cpoint"
  result = tmp_path / "killed" / "25" / "25" / "seg-25_25_25.npz"

  proc = run_cli(killed_req, box)
  deadline = time.time() + 120
  while not cpoint.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  assert cpoint.exists(), "no checkpoint before the run ended"
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 143, out
  assert cpoint.exists() and not result.exists()

  proc = run_cli(killed_req, box)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  assert "restored checkpoint" in out
  assert result.exists() and not cpoint.exists()

  proc = run_cli(ref_req, box)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  resumed, _ = storage.load_segmentation_file(str(result))
  reference, _ = storage.load_segmentation_file(str(tmp_path / "ref" / "25" / "25" / "seg-25_25_25.npz"))
  np.testing.assert_array_equal(resumed, reference)

  # A finished result is never redone or overwritten.
  mtime = result.stat().st_mtime_ns
  proc = run_cli(killed_req, box)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0 and "already" in out
  assert result.stat().st_mtime_ns == mtime
