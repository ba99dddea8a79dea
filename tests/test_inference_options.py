"""InferenceRequest options beyond the defaults: self-consistency, initial segmentation, shift
masks, alignment, ignored fields, loading results with connected components, progress estimates.

Uses the oracle predictor of tests/test_inference_canvas.py (not a model) and scripted predictors
whose outputs are known in advance.
"""

from __future__ import annotations

import logging
from collections import deque

import h5py
import numpy as np
import pytest
from scipy.special import expit, logit

from ffn.errors import FFNError
from ffn.inference import inference_pb2, seed as seed_lib, storage
from ffn.inference.canvas import MAX_SELF_CONSISTENT_ITERS, Canvas, _SeedProgress
from ffn.inference.masks import ShiftMask
from ffn.inference.request import parse_request
from ffn.inference.request import check_request, google_ignored_request_fields
from ffn.progress import Progress
from test_inference_canvas import DELTAS, FOV, _runner, blobs_image, options, oracle

GRID = seed_lib.make_policy("PolicyGrid3d", '{"step": 4, "offsets": [2]}')


def one_line(excinfo) -> str:
  text = str(excinfo.value)
  assert text and "\n" not in text, text
  return text


# -- consistency_threshold -----------------------------------------------------------------------

class Scripted:
  """Returns uniform logits for the given probabilities, one per call; records the seed inputs."""

  def __init__(self, probabilities):
    self.outputs = deque(probabilities)
    self.seeds: list[np.ndarray] = []

  def __call__(self, x: np.ndarray) -> np.ndarray:
    self.seeds.append(x[0, ..., 1].copy())
    value = np.float32(logit(self.outputs.popleft()))
    return np.full(x.shape[:-1] + (1,), value, np.float32)


def scripted_canvas(probabilities, threshold: float) -> tuple[Canvas, Scripted, tuple]:
  predict = Scripted(probabilities)
  canvas = Canvas(blobs_image(), options(consistency_threshold=threshold), predict, FOV, DELTAS)
  pos = (15, 15, 15)
  canvas.seed[10:21, 10:21, 10:21] = logit(0.5)  # the FoV input is p = 0.5 everywhere
  return canvas, predict, pos


def test_consistency_unset_is_one_evaluation():
  canvas, predict, pos = scripted_canvas([0.9, 0.1], threshold=0)
  logits = canvas.update_at(pos)
  assert len(predict.seeds) == 1
  np.testing.assert_allclose(expit(logits), 0.9, rtol=1e-6)


def test_consistency_iterates_until_mean_change_below_threshold():
  # mean |p_in - p_out|: 0.4 (vs the 0.5 input), 0.1, then 0.02 < 0.05 -> stop after 3 evaluations
  canvas, predict, pos = scripted_canvas([0.9, 0.8, 0.78, 0.1], threshold=0.05)
  logits = canvas.update_at(pos)
  assert len(predict.seeds) == 3
  np.testing.assert_allclose(expit(logits), 0.78, rtol=1e-6)
  np.testing.assert_allclose(expit(predict.seeds[1]), 0.9, rtol=1e-6)  # its own output fed back
  np.testing.assert_allclose(expit(predict.seeds[2]), 0.8, rtol=1e-6)
  np.testing.assert_allclose(expit(canvas.seed[11:20, 11:20, 11:20]), 0.78, rtol=1e-6)
  assert canvas.counters["inference-calls"] == 3


def test_consistency_stops_at_32_evaluations_keeping_the_last():
  flip = [0.1, 0.9] * MAX_SELF_CONSISTENT_ITERS
  canvas, predict, pos = scripted_canvas(flip, threshold=0.05)
  logits = canvas.update_at(pos)
  assert len(predict.seeds) == MAX_SELF_CONSISTENT_ITERS == 32
  np.testing.assert_allclose(expit(logits), 0.9, rtol=1e-6)  # the 32nd output


def test_consistency_with_seed_independent_predictor_doubles_calls_same_result():
  plain = Canvas(blobs_image(), options(), oracle, FOV, DELTAS)
  plain.segment_all(GRID)
  consistent = Canvas(blobs_image(), options(consistency_threshold=0.01), oracle, FOV, DELTAS)
  consistent.segment_all(GRID)
  np.testing.assert_array_equal(consistent.segmentation, plain.segmentation)
  assert {k: v.iters for k, v in consistent.origins.items()} == {
      k: v.iters for k, v in plain.origins.items()}  # same positions visited
  # The oracle ignores its seed input, so a 2nd evaluation repeats the 1st (change 0) and stops;
  # positions whose FoV was already predicted, up to a change < 0.01, need just one.
  positions = plain.counters["inference-calls"]
  assert positions < consistent.counters["inference-calls"] <= 2 * positions


def test_consistency_threshold_must_be_a_number():
  request = parse_request(_request_text(options_extra="consistency_threshold: nan"))
  with pytest.raises(FFNError) as e:
    check_request(request)
  assert "consistency_threshold" in one_line(e)


def _request_text(extra: str = "", options_extra: str = "") -> str:
  return ('image { hdf5: "a.h5:raw" } image_stddev: 1 model_checkpoint_path: "m" '
          'segmentation_output_dir: "o" inference_options { init_activation: 0.95 pad_value: 0.05 '
          f'move_threshold: 0.9 segment_threshold: 0.6 {options_extra} }} ' + extra)


# -- init_segmentation ---------------------------------------------------------------------------

def test_init_segmentation_relabels_and_keeps_map():
  canvas = Canvas(blobs_image(), options(), oracle, FOV, DELTAS)
  labels = np.zeros(canvas.shape, np.uint64)
  labels[0:3, 0:3, 0:3] = 2**40
  labels[26:, 26:, 26:] = 7
  canvas.init_segmentation(labels)
  np.testing.assert_array_equal(canvas.local_to_global_ids, np.array([0, 7, 2**40], np.uint64))
  assert canvas.segmentation[27, 27, 27] == 1 and canvas.segmentation[1, 1, 1] == 2
  np.testing.assert_array_equal(canvas.local_to_global_ids[canvas.segmentation], labels)
  assert np.all(canvas.seg_prob[labels > 0] == storage.quantize_probability(np.array([1.0]))[0])
  assert np.all(canvas.seg_prob[labels == 0] == 0)
  assert canvas.get_next_segment_id() == 3
  assert set(canvas.result_extras()) == {"local_to_global_ids"}


def test_init_segmentation_without_background_keeps_every_object():
  canvas = Canvas(blobs_image(), options(), oracle, FOV, DELTAS)
  labels = np.full(canvas.shape, 5, np.int32)
  labels[:15] = 9
  canvas.init_segmentation(labels)
  np.testing.assert_array_equal(canvas.local_to_global_ids, [0, 5, 9])
  assert np.all(canvas.segmentation > 0)


@pytest.mark.parametrize("labels,expect", [
    (np.zeros((30, 30, 29), np.uint8), "shape (30, 30, 29)"),
    (np.zeros((30, 30, 30), np.float32), "dtype float32"),
    (np.full((30, 30, 30), -1, np.int16), "negative ids"),
])
def test_init_segmentation_bad_input(labels, expect):
  canvas = Canvas(blobs_image(), options(), oracle, FOV, DELTAS)
  with pytest.raises(FFNError) as e:
    canvas.init_segmentation(labels, "seg.h5:s (init_segmentation)")
  text = one_line(e)
  assert expect in text and "seg.h5:s" in text


def test_runner_init_segmentation_end_to_end(tmp_path):
  truth = blobs_image() > 0
  labels = np.zeros((1, 30, 30, 30), np.uint64)  # 4D (channel, z, y, x): channel 0 is used
  labels[0, 5:25, 5:12, 5:12] = 42  # the first blob, already segmented
  with h5py.File(tmp_path / "init.h5", "w") as f:
    f["seg"] = labels
  runner = _runner(tmp_path, f'init_segmentation {{ hdf5: "{tmp_path}/init.h5:seg" }}')
  path = runner.run()
  with np.load(path, allow_pickle=True) as data:
    seg = data["segmentation"]
    table = data["local_to_global_ids"]
    origins = data["origins"].item()
  np.testing.assert_array_equal(table, np.array([0, 42], np.uint64))
  assert np.all(seg[labels[0] == 42] == 1)
  assert set(origins) == {2} and set(np.unique(seg)) == {0, 1, 2}
  assert np.sum(seg == 2) >= 0.95 * np.sum(truth[:, 15:, 15:])  # the second blob: a new object
  with np.load(str(path)[:-3] + "prob") as data:
    assert np.all(data["qprob"][seg == 1] == 255)


def test_runner_init_segmentation_must_cover_the_box(tmp_path):
  with h5py.File(tmp_path / "init.h5", "w") as f:
    f["small"] = np.zeros((20, 30, 30), np.uint32)
    f["float"] = np.zeros((30, 30, 30), np.float32)
  runner = _runner(tmp_path, f'init_segmentation {{ hdf5: "{tmp_path}/init.h5:small" }}')
  with pytest.raises(FFNError) as e:
    runner.run()
  assert "does not cover the box" in one_line(e) and "init.h5:small" in str(e.value)
  runner = _runner(tmp_path, f'init_segmentation {{ hdf5: "{tmp_path}/init.h5:float" }}')
  with pytest.raises(FFNError) as e:
    runner.run()
  assert "dtype float32" in one_line(e)
  with pytest.raises(FFNError) as e:
    _runner(tmp_path, 'init_segmentation { volinfo: "x.pbtxt" }')
  assert "init_segmentation: volinfo volumes are not supported" in one_line(e)


def test_checkpoint_keeps_local_to_global_ids(tmp_path):
  canvas = Canvas(blobs_image(), options(), oracle, FOV, DELTAS)
  labels = np.zeros(canvas.shape, np.uint32)
  labels[:2] = 11
  canvas.init_segmentation(labels)
  path = str(tmp_path / "c.cpoint")
  canvas.save_checkpoint(path, 0)
  restored = Canvas(blobs_image(), options(), oracle, FOV, DELTAS)
  restored.restore_checkpoint(path)
  np.testing.assert_array_equal(restored.local_to_global_ids, [0, 11])
  assert restored.get_next_segment_id() == 2


# -- shift masks ---------------------------------------------------------------------------------

def test_shift_mask_blocks_fov_boxes_at_scale():
  distorted = np.zeros((10, 10, 10), bool)
  distorted[5, 4, 4] = True  # full resolution z 5, y 8..9, x 8..9 (scale 2, corner 0)
  mask = ShiftMask(distorted, (0, 0, 0), 2, (-1, -1, -1), (3, 3, 3))
  assert mask.blocks((5, 8, 8)) and mask.blocks((6, 10, 10)) and mask.blocks((4, 7, 7))
  assert not mask.blocks((7, 8, 8))  # z is not scaled: 2 slices away
  assert not mask.blocks((5, 11, 8))  # y 10..12 -> coarse 5..6
  assert not mask.blocks((5, 6, 8))  # y 5..7 -> coarse 2..3
  # a corner that is not a multiple of the scale: coarse index 0 is global y (3 // 2) = 1
  shifted = ShiftMask(distorted, (0, 3, 3), 2, (0, 0, 0), (1, 1, 1))
  assert shifted.blocks((5, 7, 7))  # global y,x 10 -> coarse 5 -> local 4
  assert not shifted.blocks((5, 5, 5))  # global 8 -> coarse 4 -> local 3


def test_shift_mask_load_threshold_and_outside_is_zero(tmp_path):
  shifts = np.zeros((3, 6, 5, 5), np.int16)  # a third channel is ignored
  shifts[0, 2, 1, 1] = -4  # |-4| >= 4: distorted
  shifts[1, 3, 2, 2] = 3  # below the threshold
  shifts[2, 4, 3, 3] = 100
  with h5py.File(tmp_path / "shift.h5", "w") as f:
    f["s"] = shifts
  mask = ShiftMask.load(f"{tmp_path}/shift.h5:s", (0, 0, 0), (8, 12, 12), 2, 4, (0, 0, 0), (1, 1, 1))
  assert mask.distorted.shape == (8, 6, 6)  # beyond the dataset: shift 0
  assert list(zip(*np.nonzero(mask.distorted))) == [(2, 1, 1)]
  assert mask.blocks((2, 2, 3)) and not mask.blocks((3, 4, 4))


def _shift_runner(tmp_path, threshold: int, extra: str = ""):
  shifts = np.zeros((2, 30, 15, 15), np.float32)
  shifts[1, 10:20, 3:6, 3:6] = 10.0  # large shifts over the first blob (scale 2: y,x 6..11)
  with h5py.File(tmp_path / "shift.h5", "w") as f:
    f["s"] = shifts
  return _runner(tmp_path, f'shift_mask {{ hdf5: "{tmp_path}/shift.h5:s" }} shift_mask_scale: 2 '
                           f'shift_mask_threshold: {threshold} {extra}')


def test_runner_shift_mask_keeps_fov_out_of_distorted_region(tmp_path):
  _, origins = storage.load_segmentation_file(_shift_runner(tmp_path, 4).run())
  assert len(origins) == 1
  (origin,) = origins.values()
  assert origin.start_zyx[1] >= 15  # only the second blob


def test_runner_shift_mask_below_threshold_changes_nothing(tmp_path):
  _, origins = storage.load_segmentation_file(_shift_runner(tmp_path, 11).run())
  assert len(origins) == 2


def test_runner_shift_mask_fov_narrows_the_check(tmp_path):
  # A 1-voxel box just above the position: positions of the first blob at z 6..8 and 20..24 are
  # outside z 10..19 shifted by one, so part of the blob is still segmented.
  runner = _shift_runner(tmp_path, 4, "shift_mask_fov { start { x: 0 y: 0 z: 1 } size { x: 1 y: 1 z: 1 } }")
  seg, origins = storage.load_segmentation_file(runner.run())
  assert len(origins) == 2
  assert np.any(seg[5:25, 5:12, 5:12] > 0)


@pytest.mark.parametrize("extra,expect", [
    ('shift_mask { hdf5: "s.h5:s" }', "shift_mask_threshold must be set"),
    ('shift_mask { hdf5: "s.h5:s" } shift_mask_threshold: 4 shift_mask_scale: 0',
     "shift_mask_scale must be positive"),
    ('shift_mask { hdf5: "s.h5:s" } shift_mask_threshold: 4 '
     'shift_mask_fov { start { x: 0 y: 0 z: 0 } size { x: 1 y: 0 z: 1 } }', "shift_mask_fov.size"),
    ('shift_mask { hdf5: "s.h5" } shift_mask_threshold: 4', "shift_mask.hdf5 must be"),
])
def test_shift_mask_request_errors(extra, expect):
  with pytest.raises(FFNError) as e:
    check_request(parse_request(_request_text(extra)))
  assert expect in one_line(e)


def test_shift_mask_must_be_4d(tmp_path):
  with h5py.File(tmp_path / "shift.h5", "w") as f:
    f["s"] = np.zeros((30, 30, 30), np.float32)
  runner = _runner(tmp_path, f'shift_mask {{ hdf5: "{tmp_path}/shift.h5:s" }} shift_mask_threshold: 4')
  with pytest.raises(FFNError) as e:
    runner.run()
  assert "must be 4D (channel,z,y,x) with at least 2 channels" in one_line(e)


# -- alignment and fields google ignores ---------------------------------------------------------

def test_alignment_other_than_none_is_an_error():
  check_request(parse_request(_request_text("alignment_options { type: NO_ALIGNMENT }")))
  with pytest.raises(FFNError) as e:
    check_request(parse_request(_request_text("alignment_options { type: UNKNOWN_ALIGNMENT }")))
  assert "alignment_options.type UNKNOWN_ALIGNMENT is not supported" in one_line(e)


def test_fields_google_ignores_get_their_own_warning(caplog):
  request = parse_request(_request_text('reference_histogram: "h.npz" self_prediction { threshold: 0.5 } '
                                        'histogram_masks { image { channels { channel: 0 } } }'))
  assert google_ignored_request_fields(request) == ["reference_histogram", "self_prediction",
                                                    "histogram_masks"]
  with caplog.at_level(logging.WARNING, logger="ffn.inference.request"):
    check_request(request)
  lines = [r.getMessage() for r in caplog.records
           if r.name == "ffn.inference.request" and r.levelno == logging.WARNING]
  assert len(lines) == 1 and len(caplog.records) == 1
  assert "google/ffn (HEAD) ignores them too" in lines[0]
  assert "reference_histogram, self_prediction, histogram_masks" in lines[0]


# -- load_segmentation: connected components and small pieces ------------------------------------

def _reference_split(labels: np.ndarray) -> np.ndarray:
  """6-connected pieces of equal ids by breadth-first search, numbered in raster order."""
  out = np.zeros(labels.shape, np.int64)
  n = 0
  for start in zip(*np.nonzero(labels)):
    if out[start]:
      continue
    n += 1
    out[start] = n
    todo = [start]
    while todo:
      p = todo.pop()
      for axis in range(3):
        for step in (-1, 1):
          q = list(p)
          q[axis] += step
          q = tuple(q)
          if all(0 <= c < s for c, s in zip(q, labels.shape)) and not out[q] and labels[q] == labels[p]:
            out[q] = n
            todo.append(q)
  return out


def test_split_disconnected_components_matches_bfs_reference():
  rng = np.random.default_rng(3)
  labels = rng.choice(np.array([0, 3, 5, 2**40], np.uint64), size=(7, 8, 9), p=[0.4, 0.2, 0.2, 0.2])
  out = storage.split_disconnected_components(labels)
  assert out.dtype == np.uint64
  np.testing.assert_array_equal(out, _reference_split(labels))


def test_load_segmentation_splits_and_clears_like_google(tmp_path):
  seg = np.zeros((4, 6, 6), np.uint16)
  seg[0, 0, 0:3] = 9  # piece A of object 9 (3 voxels)
  seg[3, 5, 3:6] = 9  # piece B of object 9, far away (3 voxels)
  seg[1, 1:3, 1:3] = 4  # object 4 (4 voxels) ...
  seg[2, 3, 3] = 4  # ... and a piece touching it only along an edge (1 voxel): separate
  origins = {9: storage.OriginInfo((0, 0, 1), 2, 0.1), 4: storage.OriginInfo((1, 1, 1), 3, 0.2)}
  storage.save_subvolume(seg, origins, storage.segmentation_path(str(tmp_path), (0, 0, 0)))

  out, orig = storage.load_segmentation(str(tmp_path), (0, 0, 0))
  assert out[0, 0, 0] == 1 and out[1, 1, 1] == 2 and out[2, 3, 3] == 3 and out[3, 5, 3] == 4
  assert orig == {1: origins[9], 2: origins[4], 3: origins[4], 4: origins[9]}

  out, orig = storage.load_segmentation(str(tmp_path), (0, 0, 0), min_size=3)
  assert set(np.unique(out)) == {0, 1, 2, 4} and set(orig) == {1, 2, 4}  # the 1-voxel piece is gone

  out, orig = storage.load_segmentation(str(tmp_path), (0, 0, 0), split_cc=False, min_size=5)
  assert set(np.unique(out)) == {0, 9, 4} and set(orig) == {9, 4}  # 9 has 6 voxels, 4 has 5
  out, orig = storage.load_segmentation(str(tmp_path), (0, 0, 0), split_cc=False, min_size=6)
  assert set(np.unique(out)) == {0, 9} and set(orig) == {9}

  source = inference_pb2.SegmentationSource(directory=str(tmp_path), split_cc=False, min_size=6)
  out2, orig2 = storage.load_segmentation_from_source(source, (0, 0, 0))
  np.testing.assert_array_equal(out2, out)
  assert orig2 == orig


def test_load_segmentation_threshold_keeps_voxels_without_probability(tmp_path):
  seg = np.ones((2, 2, 2), np.uint8)
  prob = np.full(seg.shape, 0.9)
  prob[0, 0, 0] = 0.2
  prob[1, 1, 1] = np.nan  # no saved probability: google keeps the voxel
  out_dir = str(tmp_path)
  storage.save_subvolume(seg, {}, storage.segmentation_path(out_dir, (0, 0, 0)))
  storage.save_probability(storage.quantize_probability(prob), storage.object_prob_path(out_dir, (0, 0, 0)))
  out, _ = storage.load_segmentation(out_dir, (0, 0, 0), threshold=0.5, split_cc=False)
  assert out[0, 0, 0] == 0 and out[1, 1, 1] == 1 and out[0, 1, 1] == 1


def test_load_segmentation_mask_config(tmp_path):
  seg = np.ones((2, 3, 3), np.uint8)
  storage.save_subvolume(seg, {}, storage.segmentation_path(str(tmp_path), (0, 0, 0)))
  mask = np.zeros((2, 3, 3), np.uint8)
  mask[:, 1] = 1  # cuts the object into two pieces
  with h5py.File(tmp_path / "m.h5", "w") as f:
    f["m"] = mask
  config = inference_pb2.MaskConfigs()
  channel = config.masks.add().volume
  channel.mask.hdf5 = f"{tmp_path}/m.h5:m"
  channel.channels.add(channel=0, values=[1])
  out, _ = storage.load_segmentation(str(tmp_path), (0, 0, 0), mask_config=config)
  assert np.all(out[:, 1] == 0) and set(np.unique(out)) == {0, 1, 2}


# -- progress ------------------------------------------------------------------------------------

def test_progress_uses_estimate_and_excludes_initial_from_rate(caplog):
  with caplog.at_level(logging.INFO, logger="ffn.progress"):
    progress = Progress(100, "things", unit="t", log_every_s=0, initial=40,
                        estimate=lambda: (65.0, "3 objects"))
    progress.update(10)
  assert progress.count == 50 and progress.eta() == 65.0
  line = caplog.records[-1].getMessage()
  assert "things: 50/100 t (50.0%)" in line and "ETA 1:05, 3 objects" in line
  plain = Progress(100, "plain", log_every_s=1e9, initial=40)
  plain.start -= 10.0
  plain.update(10)  # 10 items in 10 s in this run: 1/s, 50 left
  assert abs(plain.eta() - 50.0) < 1.0


def test_seed_progress_live_seeds_and_eta():
  canvas = Canvas(blobs_image(), options(), oracle, FOV, DELTAS)
  policy = GRID(canvas)
  next(policy)
  tracker = _SeedProgress(canvas, policy)
  inside = [p for p in policy.coords if np.all(p >= 4) and np.all(p < 26)]
  assert tracker.live_start == len(inside) - 1  # the first point was already yielded
  canvas.segmentation[:15] = 1  # covers the candidates with z < 15
  canvas.segmented_voxels = 15 * 30 * 30
  live = sum(1 for p in inside[1:] if p[0] >= 15)
  tracker.start -= 100.0
  eta, detail = tracker.estimate()
  assert detail == f"0 objects, 50.0% voxels segmented, {live} live seeds, 0 FOV moves (0.0/s)"
  assert eta == pytest.approx(live * 100.0 / (tracker.live_start - live), rel=0.01)
  tracker.close()


def test_segment_all_reports_objects_voxels_and_live_seeds(caplog, monkeypatch):
  monkeypatch.setattr(Canvas, "PROGRESS_LOG_EVERY_S", 0.0)
  canvas = Canvas(blobs_image(), options(), oracle, FOV, DELTAS)
  with caplog.at_level(logging.INFO, logger="ffn.progress"):
    canvas.segment_all(GRID)
  lines = [r.getMessage() for r in caplog.records if r.name == "ffn.progress"]
  assert lines and all("inference seeds" in line and "live seeds" in line for line in lines)
  done = 100.0 * np.count_nonzero(canvas.segmentation > 0) / canvas.segmentation.size
  assert f"2 objects, {done:.1f}% voxels segmented, 0 live seeds" in lines[-1]
  assert canvas.segmented_voxels == np.count_nonzero(canvas.segmentation > 0)


# -- movement_policy_args and alignment_options.save_raw -------------------------------------------

def _oracle_run(tmp_path, extra=""):
  from test_inference_canvas import _runner
  runner = _runner(tmp_path, extra)
  seg, origins = storage.load_segmentation_file(runner.run())
  return runner, seg, origins


def test_movement_policy_args_override_deltas_and_score_threshold(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  (tmp_path / "c").mkdir()
  _, seg, origins = _oracle_run(tmp_path / "a")
  assert len(origins) == 2
  # larger steps along z (the blobs' long axis): fewer evaluations, same two objects
  _, seg_big, origins_big = _oracle_run(tmp_path / "b", 'movement_policy_args: "{\\"deltas\\": [4, 2, 2]}"')
  assert len(origins_big) == 2
  assert sum(o.iters for o in origins_big.values()) < sum(o.iters for o in origins.values())
  # a face logit of 4 never reaches a score threshold of 5 (logit): no object moves beyond its seed FoV
  _, seg_stuck, origins_stuck = _oracle_run(tmp_path / "c", 'movement_policy_args: "{\\"score_threshold\\": 5}"')
  assert origins_stuck and all(o.iters == 1 for o in origins_stuck.values())
  assert np.count_nonzero(seg_stuck) < np.count_nonzero(seg)


def test_save_raw_writes_the_normalised_image_beside_the_result(tmp_path):
  runner, _, _ = _oracle_run(tmp_path, "alignment_options { save_raw: true }")
  path = storage.subvolume_path(str(tmp_path / "out"), (0, 0, 0), "align")
  with np.load(path) as data:
    image = data["im"]
  from test_inference_canvas import blobs_image
  raw = ((blobs_image() + 1) * 100).astype(np.uint8)
  np.testing.assert_array_equal(image, (raw.astype(np.float32) - 100) / 100)


@pytest.mark.parametrize("fov,deltas,ok", [([33, 33, 33], [16, 8, 8], True), ([33, 33, 33], [17, 8, 8], False),
                                           ([9, 9, 8], [4, 4, 4], False), ([8, 9, 9], [4, 4, 3], True)])
def test_movement_deltas_beyond_the_fov_are_refused_at_check_time(fov, deltas, ok):
  """A face at +/- delta must lie inside the FoV: delta <= (fov - 1) // 2 (fov x,y,z, deltas z,y,x)."""
  import json
  request = parse_request(_request_text(
      f'model_args: {json.dumps(json.dumps({"fov_size": fov}))} '
      f'movement_policy_args: {json.dumps(json.dumps({"deltas": deltas}))}'))
  if ok:
    check_request(request)
    return
  with pytest.raises(FFNError) as e:
    check_request(request)
  assert f"movement_policy_args deltas {deltas} (z,y,x) must be at most" in one_line(e)


def test_movement_policy_refuses_deltas_beyond_the_fov_without_model_args():
  from test_inference_canvas import blobs_image, oracle, options as canvas_options
  from ffn.inference.canvas import Canvas
  with pytest.raises(FFNError, match=r"movement deltas \[5, 2, 2\] \(z,y,x\) must be 0..\(fov_size - 1\) // 2 "
                                     r"= \[4, 4, 4\]"):
    Canvas(blobs_image(), canvas_options(), oracle, (9, 9, 9), (5, 2, 2))


# -- 4D volumes, mask sources (google's build_mask) ------------------------------------------------

def _blob_runner(tmp_path, image_spec: str | None = None, extra: str = ""):
  """The oracle runner of test_inference_canvas on the blobs image (30^3, 200 inside the blobs)."""
  from test_inference_canvas import DELTAS as D, FOV as F, _runner
  runner = _runner(tmp_path, extra)
  if image_spec is None:
    return runner
  from ffn.inference.runner import Runner
  request = runner.request
  request.image.hdf5 = image_spec
  return Runner(request, predict=oracle, fov_size_xyz=F, deltas_xyz=D)


def _raw_blobs() -> np.ndarray:
  return ((blobs_image() + 1) * 100).astype(np.uint8)


def test_4d_image_is_segmented_from_channel_0(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  _, want, want_origins = _oracle_run(tmp_path / "a")
  image = np.stack([_raw_blobs(), 255 - _raw_blobs()])  # channel,z,y,x; channel 1 is the negative
  with h5py.File(tmp_path / "b" / "img4d.h5", "w") as f:
    f["raw"] = image
  runner = _blob_runner(tmp_path / "b", f"{tmp_path}/b/img4d.h5:raw")
  assert runner.volume_shape == (30, 30, 30)
  seg, origins = storage.load_segmentation_file(runner.run())
  np.testing.assert_array_equal(seg, want)
  assert {k: v.start_zyx for k, v in origins.items()} == {k: v.start_zyx for k, v in want_origins.items()}


def test_4d_volume_mask_channel_and_clipped_read(tmp_path):
  """Channel 1 of a 4D mask volume that covers only z < 20 of the 30^3 image: outside it the value
  is 0, so `values: 0` masks z >= 20 as well (google fills with 0 and tests the fill)."""
  mask = np.zeros((2, 20, 30, 30), np.uint8)
  mask[1, :, :15, :15] = 7  # the first blob's columns, channel 1
  with h5py.File(tmp_path / "m.h5", "w") as f:
    f["m"] = mask
  from ffn.inference.masks import build_mask
  request = parse_request(_request_text(
      f'masks {{ volume {{ mask {{ hdf5: "{tmp_path}/m.h5:m" }} channels {{ channel: 1 values: 7 }} }} }} '
      f'masks {{ volume {{ mask {{ hdf5: "{tmp_path}/m.h5:m" }} channels {{ channel: 1 values: 0 }} }} }}'))
  got = build_mask(request.masks[:1], None, "masks", (0, 0, 0), (30, 30, 30))
  want = np.zeros((30, 30, 30), bool)
  want[:20, :15, :15] = True
  np.testing.assert_array_equal(got, want)
  got = build_mask(request.masks[1:], None, "masks", (5, 0, 0), (30, 30, 30))  # global z 5..34
  want = np.ones((30, 30, 30), bool)  # value 0 everywhere but in the blob columns below z = 20
  want[:15, :15, :15] = False
  np.testing.assert_array_equal(got, want)
  with pytest.raises(FFNError, match=r"must be 4D \(channel,z,y,x\) with at least 3 channels"):
    build_mask(parse_request(_request_text(
        f'masks {{ volume {{ mask {{ hdf5: "{tmp_path}/m.h5:m" }} channels {{ channel: 2 values: 1 }} }} }}')
    ).masks, None, "masks", (0, 0, 0), (30, 30, 30))


def test_coordinate_expression_masks_over_global_xyz(tmp_path):
  from ffn.inference.masks import build_mask
  request = parse_request(_request_text(
      'masks { coordinate_expression { expression: "(z >= 12) & (x < 20 + y)" } } '
      'seed_masks { coordinate_expression { expression: "np.abs(x - 10) <= 2" } invert: true }'))
  check_request(request)
  got = build_mask(request.masks, None, "masks", (10, 0, 5), (4, 3, 30))  # corner z,y,x
  z, y, x = np.meshgrid(np.arange(10, 14), np.arange(0, 3), np.arange(5, 35), indexing="ij")
  np.testing.assert_array_equal(got, (z >= 12) & (x < 20 + y))
  seeds = build_mask(request.seed_masks, None, "seed_masks", (0, 0, 0), (2, 2, 20))
  np.testing.assert_array_equal(seeds[0, 0], np.abs(np.arange(20) - 10) > 2)
  # the runner: masking x < 15 leaves the second blob (x 17..24) only
  runner = _blob_runner(tmp_path, extra='masks { coordinate_expression { expression: "x < 15" } }')
  seg, origins = storage.load_segmentation_file(runner.run())
  assert len(origins) == 1 and not seg[:, :, :15].any()
  assert np.count_nonzero(seg[5:25, 17:25, 17:25]) >= 0.95 * 20 * 8 * 8  # the second blob


@pytest.mark.parametrize("expression,message", [
    ("z <", "is not a Python expression"),
    ("", "expression is empty"),
    ("w > 1", "failed: NameError"),
    ("__import__('os')", "failed: NameError"),
    ("z + 1", "must give booleans, got int64"),
])
def test_bad_coordinate_expressions_are_one_line(expression, message):
  from ffn.inference.masks import build_mask
  request = parse_request(_request_text(f'masks {{ coordinate_expression {{ expression: "{expression}" }} }}'))
  with pytest.raises(FFNError) as e:
    check_request(request)
    build_mask(request.masks, None, "masks", (0, 0, 0), (2, 2, 2))
  assert message in one_line(e) and "masks[0]" in str(e.value)


@pytest.mark.parametrize("mask,message", [
    ("image { channels { channel: 1 max_value: 5 } }", "masks[0].image.channels[0].channel must be 0"),
    ("image { }", "masks[0].image has no channels"),
    ("invert: true", "masks[0] has no source"),
    ('volume { mask { hdf5: "m.h5" } channels { channel: 0 } }', "masks[0].volume.mask.hdf5 must be"),
])
def test_mask_configs_are_checked_with_the_request(mask, message):
  with pytest.raises(FFNError) as e:
    check_request(parse_request(_request_text(f"masks {{ {mask} }}")))
  assert message in one_line(e)


def test_tensorstore_image_and_mask_in_a_request(tmp_path):
  """image and mask volumes as zarr:// / TensorStore JSON specs: the same result as from HDF5."""
  import json
  import tensorstore as ts
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  mask = np.zeros((30, 30, 30), np.uint8)
  mask[:, :15, :15] = 1
  with h5py.File(tmp_path / "m.h5", "w") as f:
    f["m"] = mask
  for name, data in (("img.zarr", _raw_blobs()), ("m.zarr", mask)):
    ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp_path / name)},
             "metadata": {"dtype": "|u1", "shape": [30, 30, 30], "chunks": [10, 10, 10]}},
            create=True).result()[...] = data
  h5_mask = f'masks {{ volume {{ mask {{ hdf5: "{tmp_path}/m.h5:m" }} channels {{ channel: 0 values: 1 }} }} }}'
  json_spec = json.dumps({"driver": "zarr", "kvstore": f"file://{tmp_path}/m.zarr"})
  ts_mask = (f'masks {{ volume {{ mask {{ hdf5: {json.dumps(json_spec)} }} '
             'channels { channel: 0 values: 1 } } }')
  want, want_origins = storage.load_segmentation_file(_blob_runner(tmp_path / "a", extra=h5_mask).run())
  runner = _blob_runner(tmp_path / "b", f"zarr://{tmp_path}/img.zarr", ts_mask)
  seg, origins = storage.load_segmentation_file(runner.run())
  assert len(want_origins) == 1
  np.testing.assert_array_equal(seg, want)
  assert origins.keys() == want_origins.keys()
