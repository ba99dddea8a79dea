"""The README's main job, end to end, on a small box so that it stays fast."""

import json

import numpy as np

from ffn.cli import main


def test_demo_end_to_end_small_box(tmp_path, capsys):
  out = tmp_path / "demo"
  box = "start { x: 45 y: 45 z: 45 } size { x: 60 y: 60 z: 60 }"
  argv = ["demo", "--output_dir", str(out), "--bounding_box", box, "--cluster", "local"]
  assert main(argv) == 0
  printed = capsys.readouterr().out
  seg = out / "segmentation" / "45" / "45" / "seg-45_45_45.npz"
  for path in (out / "prepare" / "partitions.h5", out / "prepare" / "coordinates.tfrecord.gz",
               out / "neuroglancer",
               out / "request.pbtxt", seg, out / "segmentation.h5", out / "preview.png"):
    assert path.exists(), path
    assert str(path) in printed
  assert (out / "neuroglancer" / "segmentation" / "info").exists()
  assert (out / "neuroglancer" / "image" / "info").exists()
  scores = json.loads((out / "scores.json").read_text())
  assert scores["voxels"] == 60 ** 3
  assert 0 < scores["segments"] < 60 and 0 <= scores["fraction_unsegmented"] < 0.8
  assert 0 <= scores["adapted_rand_error"] < 0.6
  with np.load(seg) as result:
    assert result["segmentation"].shape == (60, 60, 60)
  # A second run reuses every finished output instead of recomputing it.
  before = seg.stat().st_mtime_ns
  assert main(argv) == 0
  assert seg.stat().st_mtime_ns == before
