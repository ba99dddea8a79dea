"""Flood-fill mechanics with a deterministic pure-numpy predictor (a test oracle, not a model).

The oracle returns +4 on the bright connected component containing the FoV centre and -4
elsewhere, so each bright blob must become exactly one object. The real network is exercised
in tests/test_inference_model.py.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from scipy import ndimage

from ffn.errors import FFNError
from ffn.inference import inference_pb2, seed as seed_lib, storage
from ffn.inference.canvas import Canvas
from ffn.inference.movement import FaceMaxMovementPolicy, scored_move_offsets

FOV = (9, 9, 9)
DELTAS = (2, 2, 2)


def oracle(x: np.ndarray) -> np.ndarray:
  image = x[0, ..., 0]
  centre = tuple(s // 2 for s in image.shape)
  labels, _ = ndimage.label(image > 0)
  inside = labels == labels[centre] if labels[centre] else np.zeros(image.shape, bool)
  return np.where(inside, 4.0, -4.0).astype(np.float32)[None, ..., None]


def options(**overrides) -> inference_pb2.InferenceOptions:
  opts = inference_pb2.InferenceOptions(init_activation=0.95, pad_value=0.05, move_threshold=0.9,
                                        segment_threshold=0.6, min_segment_size=10)
  opts.min_boundary_dist.x = opts.min_boundary_dist.y = opts.min_boundary_dist.z = 1
  for k, v in overrides.items():
    setattr(opts, k, v)
  return opts


def blobs_image() -> np.ndarray:
  """Two separated bright boxes (+1) on a dark (-1) 30^3 background, z,y,x."""
  img = -np.ones((30, 30, 30), np.float32)
  img[5:25, 5:12, 5:12] = 1  # an elongated object, longer than one FoV
  img[5:25, 17:25, 17:25] = 1
  return img


def test_each_blob_becomes_one_object():
  img = blobs_image()
  canvas = Canvas(img, options(), oracle, FOV, DELTAS)
  canvas.segment_all(seed_lib.make_policy("PolicyGrid3d", '{"step": 4, "offsets": [2]}'))
  seg = np.where(canvas.segmentation < 0, 0, canvas.segmentation)
  ids = set(np.unique(seg)) - {0}
  assert len(ids) == 2
  truth, _ = ndimage.label(img > 0)
  for i in ids:
    # each object lies inside one blob and covers all of it (the FoV walks along the long axis)
    assert len(set(np.unique(truth[seg == i]))) == 1
    blob = truth[seg == i][0]
    assert np.sum(seg == i) >= 0.95 * np.sum(truth == blob)
  assert canvas.counters["inference-calls"] > 2
  assert all(info.iters >= 2 for info in canvas.origins.values())


def test_min_segment_size_rejects_and_marks_seed():
  img = blobs_image()
  canvas = Canvas(img, options(min_segment_size=100000), oracle, FOV, DELTAS)
  canvas.segment_all(seed_lib.make_policy("PolicyGrid3d", '{"step": 4, "offsets": [2]}'))
  assert not canvas.origins
  assert np.all(canvas.segmentation <= 0) and np.any(canvas.segmentation == -1)


def test_restrictor_mask_blocks_segmentation():
  img = blobs_image()
  mask = np.zeros(img.shape, bool)
  mask[:, :15, :15] = True  # covers the first blob
  canvas = Canvas(img, options(), oracle, FOV, DELTAS, restrictor_mask=mask)
  canvas.segment_all(seed_lib.make_policy("PolicyGrid3d", '{"step": 4, "offsets": [2]}'))
  assert len(canvas.origins) == 1
  (origin,) = canvas.origins.values()
  assert origin.start_zyx[1] >= 15


def test_move_offsets_face_maxima():
  logits = np.full((9, 9, 9), -5.0, np.float32)
  logits[4, 4, 6] = 3.0  # on the +x face (delta 2), centred
  logits[2, 5, 4] = 2.5  # on the -z face, one voxel off-centre in y
  moves = sorted(scored_move_offsets((2, 2, 2), logits, threshold=2.0), reverse=True)
  assert [m[1] for m in moves] == [(0, 0, 2), (-2, 1, 0)]
  assert scored_move_offsets((2, 2, 2), logits, threshold=3.5) == []


def test_movement_policy_skips_visited_cells():
  canvas = Canvas(blobs_image(), options(), oracle, FOV, DELTAS)
  canvas.seed[...] = 5.0  # every position above the move threshold (logit 2.2) ...
  canvas.seed[12, 12, 12] = -5.0  # ... but this one
  canvas.segmentation[20, 20, 20] = 1
  policy = FaceMaxMovementPolicy(canvas, DELTAS, 1.0)
  policy.reset_state((10, 10, 10))
  # Cells of 2 voxels per axis with the start at a cell centre: offsets -1..0 -> 0, 1..2 -> 1.
  assert policy.quantize_pos((10, 10, 10)) == (0, 0, 0)
  assert policy.quantize_pos((11, 10, 10)) == (1, 0, 0)
  assert policy.quantize_pos((9, 10, 10)) == (0, 0, 0)
  assert policy.quantize_pos((10, 10, 13)) == (0, 0, 2)
  logits = np.full((9, 9, 9), -5.0, np.float32)
  logits[4, 4, 6] = 3.0  # +x face: a move to (10, 10, 12)
  logits[2, 4, 4] = 2.5  # -z face: a move to (8, 10, 10)
  policy.update(logits, (10, 10, 10))  # visits cell (0, 0, 0), queues both moves, best first
  for coord in ([9, 10, 10],  # in the visited cell (0, 0, 0)
                [3, 10, 10],  # within the margin (4) of the border
                [20, 20, 20],  # already segmented
                [12, 12, 12]):  # seed below the move threshold
    policy.append((1.0, coord))
  assert next(policy) == (10, 10, 12)
  policy.update(logits, (10, 10, 12))  # visits cell (0, 0, 1); queues (10, 10, 14), (8, 10, 12)
  policy.append((1.0, [10, 10, 11]))  # in the cell just visited
  assert list(policy) == [(8, 10, 10), (10, 10, 14), (8, 10, 12)]
  assert len(policy) == 0 and canvas.counters["skip_invalid_pos"] == 2
  assert canvas.counters["skip_threshold"] == 1
  with pytest.raises(StopIteration):
    next(policy)


def _sorted_rows(points: np.ndarray) -> np.ndarray:
  """Rows of ``points`` (z,y,x) in ascending (z, y, x) order."""
  return points[np.lexsort(points.T[::-1])]


def test_peaks_policy_is_googles_with_skimage_peaks():
  """PolicyPeaks against google/ffn's steps, with skimage's peak_local_max as google calls it."""
  from skimage.feature import peak_local_max as skimage_peak_local_max
  rng = np.random.default_rng(0)
  img = blobs_image() + rng.normal(0, 0.05, (30, 30, 30)).astype(np.float32)
  canvas = Canvas(img, options(), oracle, FOV, DELTAS)
  got = seed_lib.POLICIES["PolicyPeaks"](canvas).init_coords()
  np.testing.assert_array_equal(seed_lib.POLICIES["PolicyPeaks"](canvas).init_coords(), got)
  edges = ndimage.generic_gradient_magnitude(img, ndimage.sobel)
  smoothed = ndimage.gaussian_filter(edges, 49.0 / 6.0, mode="reflect")
  dist = ndimage.distance_transform_edt(edges <= smoothed).astype(np.float32)
  noisy = dist + np.random.RandomState(42).random_sample(dist.shape) * 1e-4
  want = skimage_peak_local_max(noisy, min_distance=3, threshold_abs=0, threshold_rel=0)
  assert len(want) >= 5  # a few per blob and in the background
  np.testing.assert_array_equal(got, _sorted_rows(want))
  assert np.all(got >= 3) and np.all(got < 27)  # border of min_distance excluded


def test_grid_and_unknown_policy():
  canvas = Canvas(blobs_image(), options(), oracle, FOV, DELTAS)
  pol = seed_lib.make_policy("PolicyGrid3d", '{"step": 10, "offsets": [0]}')(canvas)
  assert len(pol.init_coords()) == 27
  with pytest.raises(FFNError, match="unknown policy 'Nope'"):
    seed_lib.make_policy("Nope")
  with pytest.raises(FFNError, match="not valid JSON"):
    seed_lib.make_policy("PolicyPeaks", "{bad")


def test_checkpoint_resume_mid_object_gives_identical_result(tmp_path):
  img = blobs_image()
  policy = seed_lib.make_policy("PolicyGrid3d", '{"step": 4, "offsets": [2]}')
  full = Canvas(img, options(), oracle, FOV, DELTAS)
  full.segment_all(policy)

  class Stop(Exception):
    pass

  calls = {"n": 0}
  def stopping_oracle(x):
    calls["n"] += 1
    if calls["n"] == 5:  # in the middle of the first object
      raise Stop
    return oracle(x)

  path = str(tmp_path / "c.cpoint")
  first = Canvas(img, options(), stopping_oracle, FOV, DELTAS, checkpoint_path=path,
                 checkpoint_interval_sec=1e-9)
  with pytest.raises(Stop):
    first.segment_all(policy)
  resumed = Canvas(img, options(), oracle, FOV, DELTAS)
  partial = resumed.restore_checkpoint(path)
  assert partial > 0
  resumed.segment_all(policy, partial_segment_iters=partial)
  np.testing.assert_array_equal(resumed.segmentation, full.segmentation)
  np.testing.assert_array_equal(resumed.seg_prob, full.seg_prob)
  assert {k: v.iters for k, v in resumed.origins.items()} == {k: v.iters for k, v in full.origins.items()}


def _interrupted_checkpoint(tmp_path, policy) -> str:
  """Our checkpoint of a canvas stopped by an exception at its 5th network call (mid-object)."""
  class Stop(Exception):
    pass

  calls = {"n": 0}
  def stopping_oracle(x):
    calls["n"] += 1
    if calls["n"] == 5:
      raise Stop
    return oracle(x)

  path = str(tmp_path / "ours.cpoint")
  first = Canvas(blobs_image(), options(), stopping_oracle, FOV, DELTAS, checkpoint_path=path,
                 checkpoint_interval_sec=1e-9)
  with pytest.raises(Stop):
    first.segment_all(policy)
  return path


def test_checkpoint_has_googles_shapes_and_googles_restore_reads_it(tmp_path):
  """movement_policy is google HEAD's np.asarray([(deque, set, start)], dtype=object) and
  seed_policy_state google's np.asarray((coords, idx), dtype=object); the reads google's
  restore_checkpoint does (``state[0]`` unpacked into three, the seed state into two, ``.item()``
  of origins, overlaps and counters) work on it."""
  import collections
  import json
  policy = seed_lib.make_policy("PolicyGrid3d", '{"step": 4, "offsets": [2]}')
  path = _interrupted_checkpoint(tmp_path, policy)
  with np.load(path, allow_pickle=True) as data:
    movement, seed_state = data["movement_policy"], data["seed_policy_state"]
    assert movement.dtype == object and movement.shape == (1, 3)
    scored_coords, done_rounded_coords, start_pos = movement[0]
    assert isinstance(scored_coords, collections.deque) and isinstance(done_rounded_coords, set)
    assert len(done_rounded_coords) > 0 and len(start_pos) == 3
    assert seed_state.dtype == object and seed_state.shape == (2,)
    coords, idx = seed_state
    assert coords.shape[1] == 3 and 0 <= idx < coords.shape[0]
    assert isinstance(data["origins"].item(), dict) and isinstance(data["overlaps"].item(), dict)
    assert isinstance(json.loads(data["counters"].item()), dict)
    for key in ("segmentation", "seed", "seg_qprob", "history", "history_deleted"):
      assert key in data


def _rewrite_checkpoint(ours: str, out: str, form: str) -> None:
  """Our checkpoint ``ours`` rewritten as ``google`` builds one (its save_checkpoint's keys and
  values: np.savez_compressed of the raw dicts, the movement state as
  np.asarray([(deque, set, start)], dtype=object), the seed state as
  np.asarray((coords, idx), dtype=object); no min_pos/max_pos/partial_segment_iters), or in the
  ``old`` form this toolkit wrote before (0-d boxed tuples)."""
  import collections
  with np.load(ours, allow_pickle=True) as data:
    arrays = {k: data[k] for k in data.files}
  seed_state, movement = arrays["seed_policy_state"], arrays["movement_policy"]
  coords, idx = seed_state.item() if seed_state.shape == () else seed_state
  queue, done, start = movement.item() if movement.shape == () else movement[0]
  if form == "google":
    np.savez_compressed(
        out, movement_policy=np.asarray([(collections.deque(queue), set(done), tuple(start))],
                                        dtype=object),
        segmentation=arrays["segmentation"], seg_qprob=arrays["seg_qprob"], seed=arrays["seed"],
        origins=arrays["origins"].item(), overlaps=arrays["overlaps"].item(),
        history=np.array([]), history_deleted=np.array([]),
        seed_policy_state=np.asarray((coords, idx), dtype=object),
        counters=str(arrays["counters"]))
  else:
    def boxed(value):
      box = np.empty((), dtype=object)
      box[()] = value
      return box
    arrays["movement_policy"] = boxed((list(queue), set(done), list(start)))
    arrays["seed_policy_state"] = boxed((coords, idx))
    np.savez_compressed(out, **arrays)
  os.replace(out + ".npz", out)


@pytest.mark.parametrize("form", ["google", "old"])
def test_google_and_old_checkpoints_resume_to_the_uninterrupted_result(tmp_path, form):
  """A checkpoint built the way google/ffn builds it (and one in our earlier form) restores and
  finishes with the segmentation of an uninterrupted run. The old code refused google's
  (movement state of shape (1, 3) has no ``.item()``; no min_pos)."""
  img = blobs_image()
  policy = seed_lib.make_policy("PolicyGrid3d", '{"step": 4, "offsets": [2]}')
  full = Canvas(img, options(), oracle, FOV, DELTAS)
  full.segment_all(policy)
  path = str(tmp_path / f"{form}.cpoint")
  _rewrite_checkpoint(_interrupted_checkpoint(tmp_path, policy), path, form)
  resumed = Canvas(img, options(), oracle, FOV, DELTAS)
  partial = resumed.restore_checkpoint(path)
  assert (partial > 0) == (form == "old")  # google's form has no in-flight object: restarted
  resumed.segment_all(policy, partial_segment_iters=partial)
  np.testing.assert_array_equal(resumed.segmentation, full.segmentation)
  np.testing.assert_array_equal(resumed.seg_prob, full.seg_prob)
  assert {k: v.start_zyx for k, v in resumed.origins.items()} == \
      {k: v.start_zyx for k, v in full.origins.items()}


def test_invert_origins_policy(tmp_path):
  img = blobs_image()
  canvas = Canvas(img, options(), oracle, FOV, DELTAS)
  canvas.segment_all(seed_lib.make_policy("PolicyGrid3d", '{"step": 4, "offsets": [2]}'))
  out = str(tmp_path)
  storage.save_subvolume(np.maximum(canvas.segmentation, 0), canvas.origins,
                         storage.segmentation_path(out, (0, 0, 0)))
  inv = Canvas(img, options(), oracle, FOV, DELTAS)
  pol = seed_lib.make_policy("PolicyInvertOrigins", f'{{"segmentation_dir": "{out}"}}')(inv)
  coords = pol.init_coords()
  expected = [canvas.origins[i].start_zyx for i in sorted(canvas.origins, reverse=True)]
  np.testing.assert_array_equal(coords, np.array(expected))


def _runner(tmp_path, extra=""):
  import h5py
  from ffn.inference.request import parse_request
  from ffn.inference.runner import Runner
  raw = ((blobs_image() + 1) * 100).astype(np.uint8)  # 0 background, 200 inside blobs
  with h5py.File(tmp_path / "img.h5", "w") as f:
    f["raw"] = raw
  text = f"""
  image {{ hdf5: "{tmp_path}/img.h5:raw" }} image_mean: 100 image_stddev: 100
  model_checkpoint_path: "unused" segmentation_output_dir: "{tmp_path}/out"
  seed_policy: "PolicyGrid3d" seed_policy_args: "{{\\"step\\": 4, \\"offsets\\": [2]}}"
  inference_options {{ init_activation: 0.95 pad_value: 0.05 move_threshold: 0.9
    segment_threshold: 0.6 min_segment_size: 10 min_boundary_dist {{ x: 1 y: 1 z: 1 }} }}
  {extra}"""
  return Runner(parse_request(text), predict=oracle, fov_size_xyz=FOV, deltas_xyz=DELTAS)


def test_runner_saves_result_and_never_overwrites(tmp_path):
  runner = _runner(tmp_path)
  path = runner.run()
  seg, origins = storage.load_segmentation_file(path)
  assert len(origins) == 2 and seg.shape == (30, 30, 30)
  mtime = os.stat(path).st_mtime_ns
  assert _runner(tmp_path).run() == path
  assert os.stat(path).st_mtime_ns == mtime


def test_runner_image_mask_on_raw_values(tmp_path):
  # Mask raw values >= 150 (the blobs): nothing may be segmented.
  runner = _runner(tmp_path, "masks { image { channels { channel: 0 min_value: 150 max_value: 255 } } }")
  seg, origins = storage.load_segmentation_file(runner.run())
  assert not origins and not seg.any()


def test_runner_seed_mask_blocks_one_blob(tmp_path):
  import h5py
  mask = np.zeros((30, 30, 30), np.uint8)
  mask[:, :15, :15] = 1
  with h5py.File(tmp_path / "mask.h5", "w") as f:
    f["m"] = mask
  runner = _runner(tmp_path, f'seed_masks {{ volume {{ mask {{ hdf5: "{tmp_path}/mask.h5:m" }} '
                             'channels { channel: 0 values: 1 } } }')
  _, origins = storage.load_segmentation_file(runner.run())
  assert len(origins) == 1


def test_concurrent_checkpoint_saves_do_not_add_up_in_memory(tmp_path):
  """Four canvases saving checkpoints at the same moment (one thread each) allocate at the peak
  little more than one save does: saves are streamed and serialised (one at a time per process).
  The old code compressed every archive in memory with no lock, so the four saves' buffers were
  held at once (about 4x)."""
  import threading
  import tracemalloc

  def canvas(seed):
    c = Canvas(np.zeros((64, 64, 64), np.float32), options(), oracle, FOV, DELTAS)
    rng = np.random.default_rng(seed)
    c.seed[:] = rng.normal(0, 3, c.shape).astype(np.float32)  # incompressible logits
    c.segmentation[:] = rng.integers(0, 50, c.shape)
    return c

  canvases = [canvas(i) for i in range(4)]

  def peak_of(jobs):
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    threads = [threading.Thread(target=c.save_checkpoint, args=(str(tmp_path / f"{i}.cpoint"), 0))
               for i, c in jobs]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return peak

  single = peak_of([(0, canvases[0])])
  together = peak_of(list(enumerate(canvases)))
  state = canvases[0].seed.nbytes
  assert single > state / 4  # the measurement sees the save's buffers at all
  assert together < 1.6 * single, (single, together)
  for i in range(4):
    with np.load(tmp_path / f"{i}.cpoint", allow_pickle=True) as data:
      np.testing.assert_array_equal(data["seed"], canvases[i].seed)


def test_segment_all_closes_its_progress_bar_when_a_step_raises():
  """A failing network call inside segment_all still closes the seed progress bar (tqdm), so no
  bar is left drawn on the terminal or registered with tqdm."""
  from tqdm import tqdm

  def failing(x):
    raise RuntimeError("device lost")

  before = set(tqdm._instances)
  canvas = Canvas(blobs_image(), options(), failing, FOV, DELTAS)
  canvas.progress_bar = True
  with pytest.raises(RuntimeError, match="device lost"):
    canvas.segment_all(seed_lib.make_policy("PolicyGrid3d", '{"step": 4, "offsets": [2]}'))
  assert set(tqdm._instances) - before == set()
  assert canvas._progress is None


def test_runner_counters_from_concurrent_canvas_builds_lose_no_update(tmp_path):
  """Four threads build canvases at once (as segment_boxes does); every thread sleeps 1 ms at
  every bytecode inside Counters.increment, so unlocked read-modify-writes of the runner's
  counters would interleave and lose updates. All 12 image loads are counted."""
  import sys
  import threading
  import time
  from ffn.axes import BoundingBox
  from ffn.inference import counters as counters_lib
  runner = _runner(tmp_path)
  increment_code = counters_lib.Counters.increment.__code__

  def slow_opcodes(frame, event, arg):
    if event == "opcode":
      time.sleep(0.001)
    return slow_opcodes

  def tracer(frame, event, arg):
    if frame.f_code is increment_code:
      frame.f_trace_opcodes = True
      return slow_opcodes
    return None

  start = threading.Barrier(4)

  def build():
    start.wait()
    sys.settrace(tracer)
    try:
      for _ in range(3):
        runner.make_canvas(BoundingBox((0, 0, 0), (30, 30, 30)), predict=oracle,
                           counters=counters_lib.Counters())
    finally:
      sys.settrace(None)

  threads = [threading.Thread(target=build) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(120)
  assert runner.counters["load-image-calls"] == 12
