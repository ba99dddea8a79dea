"""Progress reports: counts and rates, and reports while one long object grows."""

from __future__ import annotations

import logging
import re

import numpy as np
from scipy import ndimage

from ffn.inference import inference_pb2, seed as seed_lib
from ffn.inference.canvas import Canvas
from ffn.progress import Progress


def _oracle(x: np.ndarray) -> np.ndarray:
  """+4 on the bright connected component holding the FoV centre, -4 elsewhere (a test oracle)."""
  image = x[0, ..., 0]
  labels, _ = ndimage.label(image > 0)
  centre = labels[tuple(s // 2 for s in image.shape)]
  inside = labels == centre if centre else np.zeros(image.shape, bool)
  return np.where(inside, 4.0, -4.0).astype(np.float32)[None, ..., None]


def _options() -> inference_pb2.InferenceOptions:
  opts = inference_pb2.InferenceOptions(init_activation=0.95, pad_value=0.05, move_threshold=0.9,
                                        segment_threshold=0.6, min_segment_size=10)
  opts.min_boundary_dist.x = opts.min_boundary_dist.y = opts.min_boundary_dist.z = 1
  return opts


def test_progress_reports_inside_one_object(monkeypatch, caplog):
  """One long bright bar takes many FOV moves: reports come during it, naming its seed, its moves
  so far (1, 2, ...) and its voxels so far; the last one before it ends matches the object saved."""
  image = -np.ones((40, 20, 20), np.float32)
  image[4:36, 8:12, 8:12] = 1  # 32 x 4 x 4 voxels along z: FOV 9, step 2 -> many moves
  monkeypatch.setattr(Canvas, "PROGRESS_LOG_EVERY_S", 0.0)  # a log line at every chance
  canvas = Canvas(image, _options(), _oracle, (9, 9, 9), (2, 2, 2))
  canvas.progress_bar = False
  with caplog.at_level(logging.INFO, logger="ffn.progress"):
    canvas.segment_all(seed_lib.make_policy("PolicyGrid3d", '{"step": 4, "offsets": [2]}'))
  assert len(canvas.origins) == 1
  origin = canvas.origins[1]
  seed = ",".join(str(v) for v in origin.start_zyx)
  pattern = re.compile(rf"growing object from seed z,y,x {seed}: (\d+) FOV moves, (\d+) voxels so far")
  reports = [tuple(int(g) for g in m.groups()) for m in map(pattern.search, caplog.messages) if m]
  moves = [m for m, _ in reports]
  assert moves == list(range(1, origin.iters + 1))  # one report after every move of the object
  assert origin.iters > 5
  voxels = [v for _, v in reports]
  assert voxels == sorted(voxels) and voxels[0] > 0
  assert voxels[-1] == np.count_nonzero(canvas.segmentation == 1) == 32 * 4 * 4
  # the final line counts every move of the run (failed seeds' too) and names no object
  final = caplog.messages[-1]
  assert "(done in " in final and "growing object" not in final
  assert int(re.search(r", (\d+) FOV moves \(", final).group(1)) == canvas.counters["inference-calls"]


def test_tick_logs_without_counting(caplog):
  details = iter(["a", "b"])
  progress = Progress(10, "work", log_every_s=0.0, estimate=lambda: (None, next(details)), bar=False)
  with caplog.at_level(logging.INFO, logger="ffn.progress"):
    progress.tick()
    progress.update(3)
  assert progress.count == 3
  assert caplog.messages[0].startswith("work: 0/10 it (0.0%)") and caplog.messages[0].endswith(", a")
  assert caplog.messages[1].startswith("work: 3/10 it (30.0%)") and caplog.messages[1].endswith(", b")
