"""Seed policies as google/ffn HEAD has them: arguments checked up front, masks in PolicyPeaks,
every policy of google's seed.py, weak canvas references and stop requests during set-up."""

from __future__ import annotations

import gc
import logging
import weakref

import numpy as np
import pytest
from scipy import ndimage
from skimage.feature import peak_local_max

from ffn.errors import FFNError
from ffn.inference import seed as seed_lib
from ffn.inference.canvas import Canvas, InferenceInterrupted
from test_inference_canvas import DELTAS, FOV, blobs_image, options, oracle


def _noisy_blobs() -> np.ndarray:
  return blobs_image() + np.random.default_rng(0).normal(0, 0.05, (30, 30, 30)).astype(np.float32)


def _google_peaks(image, mask=None, seed_mask=None, segmentation=None) -> np.ndarray:
  """google/ffn HEAD's PolicyPeaks steps written out (edt.edt -> scipy, isotropic)."""
  edges = ndimage.generic_gradient_magnitude(image, ndimage.sobel)
  is_edge = edges > ndimage.gaussian_filter(edges, 49.0 / 6.0, mode="reflect")
  excluded = np.zeros(image.shape, bool) if segmentation is None else segmentation > 0
  for m in (mask, seed_mask):
    if m is not None:
      excluded |= m
      is_edge[m] = True
  if is_edge.all():
    return np.zeros((0, 3), np.int64)
  dist = ndimage.distance_transform_edt(1 - is_edge).astype(np.float32)
  dist[excluded] = -1
  noisy = dist + np.random.RandomState(42).rand(*dist.shape) * 1e-4
  peaks = peak_local_max(noisy, min_distance=3, threshold_abs=0, threshold_rel=0)
  return np.array(sorted(tuple(p) for p in peaks), dtype=np.int64).reshape(-1, 3)


def test_peaks_with_masks_and_segmentation_are_googles():
  img = _noisy_blobs()
  mask = np.zeros(img.shape, bool)
  mask[:, :, 20:] = True
  seed_mask = np.zeros(img.shape, bool)
  seed_mask[:12] = True
  canvas = Canvas(img, options(), oracle, FOV, DELTAS, restrictor_mask=mask, seed_mask=seed_mask)
  canvas.segmentation[14:20, 5:12, 5:12] = 1
  got = seed_lib.POLICIES["PolicyPeaks"](canvas).init_coords()
  want = _google_peaks(img, mask, seed_mask, canvas.segmentation)
  assert len(want) >= 3
  np.testing.assert_array_equal(got, want)
  assert not (mask | seed_mask | (canvas.segmentation > 0))[tuple(got.T)].any()
  # without masks the same image has candidates in the masked parts: the masks changed the result
  plain = Canvas(img, options(), oracle, FOV, DELTAS)  # policies hold their canvas weakly
  unmasked = seed_lib.POLICIES["PolicyPeaks"](plain).init_coords()
  assert (mask | seed_mask)[tuple(unmasked.T)].any()


def test_peaks_everything_masked_gives_no_seeds():
  img = _noisy_blobs()
  canvas = Canvas(img, options(), oracle, FOV, DELTAS, seed_mask=np.ones(img.shape, bool))
  assert seed_lib.POLICIES["PolicyPeaks"](canvas).init_coords().shape == (0, 3)


@pytest.mark.parametrize("policy,args,message", [
    ("PolicyGrid3d", '{"step": "a"}', r"seed_policy_args.step of PolicyGrid3d must be an integer >= 1, got \"a\""),
    ("PolicyGrid3d", '{"step": 0}', r"step of PolicyGrid3d must be an integer >= 1, got 0"),
    ("PolicyGrid3d", '{"offsets": 5}', r"offsets of PolicyGrid3d must be a list of integers >= 0, got 5"),
    ("PolicyInvertOrigins", '{"segmentation_dir": "x", "corner": [1, 2]}',
     r"corner of PolicyInvertOrigins must be 3 integers >= 0 \(z,y,x\), got \[1, 2\]"),
    ("PolicyInvertOrigins", '{}', "PolicyInvertOrigins needs 'segmentation_dir'"),
    ("PolicyPeaks", '{"subvol_size": [0, 5, 5]}', r"subvol_size of PolicyPeaks must be 3 integers >= 1"),
    ("PolicyDenseSeeds", '{"invert": 1}', r"invert of PolicyDenseSeeds must be true or false"),
    ("PolicyPeaks2d", '{"sort_cmp": "up"}', r"sort_cmp of PolicyPeaks2d must be 'ascending' or"),
    ("ReverseCoords", '{"policy_to_reverse": "Nope"}', r"policy_to_reverse of ReverseCoords: unknown policy \"Nope\""),
    ("SequentialPolicies", '{"policies": [["PolicyGrid3d", {"step": -1}]]}', r"step of PolicyGrid3d must be"),
    ("SequentialPolicies", '{"policies": "PolicyMax"}', r"policies of SequentialPolicies must be a non-empty list"),
])
def test_policy_arguments_are_checked_before_any_canvas(policy, args, message):
  with pytest.raises(FFNError, match=message) as e:
    seed_lib.make_policy(policy, args)
  assert "\n" not in str(e.value)


def test_unknown_arguments_warn_once_and_google_corner_is_accepted(caplog):
  seed_lib._warn_unknown.cache_clear()
  with caplog.at_level(logging.WARNING):
    for _ in range(2):
      make = seed_lib.make_policy("PolicyGrid3d", '{"step": 10, "offsets": [0], "colour": 1, '
                                  '"corner": [0, 0, 0], "subvol_size": [30, 30, 30]}')
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert warnings == ["seed_policy_args: PolicyGrid3d ignores colour (google/ffn drops unknown "
                      "arguments too)"]
  canvas = Canvas(blobs_image(), options(), oracle, FOV, DELTAS)
  assert len(make(canvas).init_coords()) == 27


def _canvas() -> Canvas:
  return Canvas(_noisy_blobs(), options(), oracle, FOV, DELTAS)


def _points(name: str, args: str = "", canvas: Canvas | None = None) -> np.ndarray:
  canvas = canvas or _canvas()  # referenced here: policies hold their canvas weakly
  policy = seed_lib.make_policy(name, args)(canvas)
  return np.array(list(policy), dtype=np.int64).reshape(-1, 3)


def test_every_google_policy_is_registered_and_runs():
  google = {"PolicyPeaks", "PolicyPeaks2d", "PolicyFillEmptySpace", "PolicyMax", "PolicyMaxPeaks",
            "PolicyImagePeaks3D2D", "PolicyImagePeaks2DDisk", "PolicyGrid3d", "PolicyGrid2d",
            "PolicyInvertOrigins", "PolicyDenseSeeds", "ReverseCoords", "SequentialPolicies"}
  assert google <= set(seed_lib.POLICIES)
  img = _noisy_blobs()
  margin = np.array(FOV) // 2
  for name, args in [("PolicyPeaks2d", '{"min_distance": 3, "threshold_abs": 1}'),
                     ("PolicyMaxPeaks", ""), ("PolicyImagePeaks3D2D", ""), ("PolicyImagePeaks2DDisk", ""),
                     ("PolicyGrid2d", '{"step": 8, "offsets": [4]}')]:
    points = _points(name, args)
    assert len(points) > 0, name
    assert np.all(points >= margin) and np.all(points < np.array(img.shape) - margin), name
  # oracles: the definitions, computed independently
  dense = _points("PolicyDenseSeeds", '{"threshold": 0.5, "num_erosions": 1}')
  inside = ndimage.binary_erosion(img > 0.5, structure=ndimage.generate_binary_structure(3, 1))
  want = np.argwhere(inside)
  want = want[np.all((want >= margin) & (want < 30 - margin), axis=1)]
  np.testing.assert_array_equal(dense, want)
  grid2d = _points("PolicyGrid2d", '{"step": 8, "offsets": [4]}')
  assert len(grid2d) == (30 - 8) * 3 * 3  # z 4..25 inside the margin, y and x at 4, 12, 20
  peaks = _points("PolicyPeaks")
  np.testing.assert_array_equal(_points("ReverseCoords", '{"policy_to_reverse": "PolicyPeaks"}'), peaks[::-1])
  grid = _points("PolicyGrid3d", '{"step": 10, "offsets": [5]}')
  np.testing.assert_array_equal(
      _points("SequentialPolicies", '{"policies": [["PolicyPeaks", {}], ["PolicyGrid3d", {"step": 10, '
              '"offsets": [5]}]]}'), np.concatenate([peaks, grid]))
  max_peaks = _points("PolicyMaxPeaks")
  assert np.all(img[tuple(max_peaks.T)] > 0.5)  # image peaks lie in the bright blobs


def test_fill_empty_space_seeds_only_unsegmented_gaps():
  canvas = _canvas()
  canvas.segmentation[:, :8] = 1
  canvas.segmentation[:, 22:] = 2
  points = _points("PolicyFillEmptySpace", canvas=canvas)
  assert len(points) > 0 and np.all((points[:, 1] >= 13) & (points[:, 1] <= 16))  # mid-gap


def test_canvas_with_its_policies_is_freed_without_the_cyclic_gc():
  """Seed and movement policies hold their canvas weakly, so canvas <-> policy is no cycle. (One
  object is grown with segment_at; segment_all's progress reporter is the canvas' own business.)"""
  gc.collect()
  gc.disable()
  try:
    canvas = _canvas()
    canvas.seed_policy = seed_lib.make_policy("PolicyPeaks")(canvas)
    seeds = list(canvas.seed_policy)
    assert canvas.segment_at(seeds[0]) > 0 and len(canvas.movement_policy.done_rounded_coords) > 0
    ref = weakref.ref(canvas)
    del canvas
    assert ref() is None
  finally:
    gc.enable()



def test_finished_canvas_is_freed_without_the_cyclic_gc():
  """After segment_all (its progress reporter included) the canvas is freed by reference
  counting alone."""
  gc.collect()
  gc.disable()
  try:
    canvas = _canvas()
    canvas.segment_all(seed_lib.make_policy("PolicyPeaks"))
    assert canvas.segmentation.max() > 0
    ref = weakref.ref(canvas)
    del canvas
    assert ref() is None
  finally:
    gc.enable()

def test_stop_request_is_seen_during_peaks_set_up():
  canvas = _canvas()
  canvas.stop_requested = True  # as Runner.request_stop sets it on SIGTERM
  with pytest.raises(InferenceInterrupted):
    canvas.segment_all(seed_lib.make_policy("PolicyPeaks"))
  assert canvas.seed_policy.coords is None  # stopped inside the set-up, not after it
