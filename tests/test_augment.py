"""EM augmentations (ffn/training/augment.py): identity at zero strength, oracles, fixed-seed golden
draws and outputs, image/label consistency, and their place in the example pipeline."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
from scipy import ndimage

from ffn.errors import FFNError
from ffn.training import augment as aug
from ffn.training import examples
from ffn.training.data import ExampleSource

ALL = aug.AugmentConfig(rotation_max_deg=180, elastic_alpha=3, elastic_sigma=3, misalign_prob=1.0,
                        misalign_max_shift=3, missing_section_prob=0.2, blur_section_prob=0.2,
                        blur_max_sigma=1.5, brightness=0.3, contrast=0.3, gamma=0.5,
                        noise_stddev=0.2)


def _patch(shape=(7, 11, 11), seed=0):
  rng = np.random.default_rng(seed)
  return rng.random(shape).astype(np.float32), rng.integers(0, 6, shape)


def test_zero_strength_is_the_identity_and_draws_nothing():
  image, labels = _patch()
  cfg = aug.AugmentConfig(misalign_prob=1.0, elastic_sigma=9.0, blur_max_sigma=5.0)  # no strength
  assert not cfg.geometric and cfg.margin_xy(image.shape) == 0
  rng = np.random.default_rng(5)
  assert aug.rotation_angle(rng, 0) == 0.0
  assert aug.elastic_field(rng, image.shape, 0.0, 3.0) is None
  assert aug.misalignment_shifts(rng, 7, 1.0, 0) is None
  assert aug.sections(rng, cfg, image) is image
  assert aug.photometric(rng, cfg, image) is image
  assert rng.random() == np.random.default_rng(5).random()  # the RNG was not advanced
  out_image, out_labels = aug.warp(image, labels, (0, 0, 0), image.shape)
  np.testing.assert_array_equal(out_image, image)
  np.testing.assert_array_equal(out_labels, labels)


def test_rotation_by_quarter_turns_is_rot90_and_keeps_the_centre():
  image, labels = _patch((5, 9, 9))
  for quarter in (1, 2, 3):
    out_image, out_labels = aug.warp(image, labels, (0, 0, 0), image.shape, quarter * math.pi / 2)
    # Counter-clockwise from +x towards +y is numpy's rotation from axis 2 (x) to axis 1 (y).
    np.testing.assert_array_equal(out_image, np.rot90(image, quarter, axes=(2, 1)))
    np.testing.assert_array_equal(out_labels, np.rot90(labels, quarter, axes=(2, 1)))
  out_image, out_labels = aug.warp(image, labels, (0, 0, 0), image.shape, 0.7)
  assert out_labels.dtype == labels.dtype and out_image.dtype == np.float32
  assert out_labels[2, 4, 4] == labels[2, 4, 4] and out_image[2, 4, 4] == image[2, 4, 4]


def test_rotation_matches_a_per_voxel_bilinear_and_nearest_oracle():
  """31 degrees (no source position is a rounding tie) out of a context 4 voxels larger each side
  (no position leaves it)."""
  context, context_labels = _patch((3, 17, 17), seed=1)
  size, start, angle = (3, 9, 9), (0, 4, 4), math.radians(31)
  out_image, out_labels = aug.warp(context, context_labels, start, size, angle)
  for z in range(3):
    for y in range(9):
      for x in range(9):
        dy, dx = y - 4, x - 4
        sy = 4 + 4 + math.cos(angle) * dy - math.sin(angle) * dx
        sx = 4 + 4 + math.sin(angle) * dy + math.cos(angle) * dx
        y0, x0 = math.floor(sy), math.floor(sx)
        fy, fx = sy - y0, sx - x0
        c = context[z].astype(np.float64)
        want = ((1 - fy) * (1 - fx) * c[y0, x0] + (1 - fy) * fx * c[y0, x0 + 1]
                + fy * (1 - fx) * c[y0 + 1, x0] + fy * fx * c[y0 + 1, x0 + 1])
        # float32 output of values in [0, 1): a few float32 ulps of 1
        assert abs(out_image[z, y, x] - want) <= 4 * np.finfo(np.float32).eps, (z, y, x)
        assert out_labels[z, y, x] == context_labels[z, round(sy), round(sx)], (z, y, x)


def test_labels_are_sampled_where_the_image_is():
  """With every geometric augmentation on, the labels' nearest source voxel is within half a voxel
  of the image's (bilinear) source position: ramps in y and x make the image report its source
  position exactly, a voxel-id label volume reports the label's."""
  size = (9, 15, 15)
  cfg = aug.AugmentConfig(rotation_max_deg=180, elastic_alpha=2.5, elastic_sigma=2,
                          misalign_prob=1.0, misalign_max_shift=2)
  m = cfg.margin_xy(size)
  shape = (9, 15 + 2 * m, 15 + 2 * m)
  zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
  ids = (zz * shape[1] + yy) * shape[2] + xx
  for seed in range(3):
    got = []
    for ramp in (yy, xx):
      image, labels = aug.geometric(np.random.default_rng(seed), cfg, ramp.astype(np.float32), ids,
                                    (0, m, m), size)
      got.append(image)
    label_y = (labels // shape[2]) % shape[1]
    label_x = labels % shape[2]
    np.testing.assert_array_equal(labels // (shape[1] * shape[2]), zz[:, :15, :15])  # z kept
    # |round(p) - p| <= 0.5, plus float32 rounding of positions below 2^6
    assert np.abs(label_y - got[0]).max() <= 0.5 + 1e-4
    assert np.abs(label_x - got[1]).max() <= 0.5 + 1e-4
    assert got[0].min() >= 0 and got[0].max() <= shape[1] - 1  # margin_xy held every position


def test_margin_covers_the_rotated_corners():
  cfg = aug.AugmentConfig(rotation_max_deg=45)
  assert cfg.margin_xy((5, 49, 49)) == math.ceil(24 * math.sqrt(2) - 24)  # 10
  both = aug.AugmentConfig(rotation_max_deg=45, elastic_alpha=2.5, misalign_prob=0.5,
                           misalign_max_shift=3)
  assert both.margin_xy((5, 49, 49)) == math.ceil(24 * math.sqrt(2) - 24 + 2.5 + 3)


def test_golden_draws_for_fixed_seeds():
  """numpy's PCG64 streams are the same on every platform: these draws are fixed."""
  assert math.degrees(aug.rotation_angle(np.random.default_rng(0), 180)) == pytest.approx(
      49.306207435723536, abs=1e-9)
  shifts = aug.misalignment_shifts(np.random.default_rng(3), 8, 1.0, 4)
  rows = np.flatnonzero(np.any(shifts != 0, axis=1))
  assert rows.tolist() == list(range(rows[0], rows[-1] + 1)) and rows[0] >= 1  # one run, not z 0
  assert np.all(shifts[rows] == shifts[rows[0]]) and np.abs(shifts).max() <= 4
  assert shifts.tolist() == GOLDEN_SHIFTS_SEED3
  assert aug.misalignment_shifts(np.random.default_rng(3), 8, 0.0, 4) is None


GOLDEN_SHIFTS_SEED3 = [[0, 0], [0, 0], [-3, 3], [-3, 3], [0, 0], [0, 0], [0, 0], [0, 0]]


def test_elastic_field_peak_is_alpha_and_smooth():
  field = aug.elastic_field(np.random.default_rng(1), (12, 20, 20), 3.0, 4.0)
  assert field.shape == (2, 12, 20, 20) and field.dtype == np.float32
  assert float(np.abs(field).max()) == pytest.approx(3.0, rel=1e-6)
  # Smooth: neighbouring displacements differ far less than the field varies.
  steps = np.abs(np.diff(field, axis=3))
  assert steps.max() < 0.5 * 3.0 and field.std() > 0.2
  again = aug.elastic_field(np.random.default_rng(1), (12, 20, 20), 3.0, 4.0)
  np.testing.assert_array_equal(field, again)


def test_misalignment_shifts_a_run_of_sections_exactly():
  context, labels = _patch((6, 16, 16), seed=2)
  shifts = np.zeros((6, 2), np.int64)
  shifts[2:5] = (2, -3)  # dy, dx
  out_image, out_labels = aug.warp(context, labels, (0, 4, 4), (6, 8, 8), shifts=shifts)
  for z in range(6):
    dy, dx = shifts[z]
    np.testing.assert_array_equal(out_image[z], context[z, 4 - dy:12 - dy, 4 - dx:12 - dx])
    np.testing.assert_array_equal(out_labels[z], labels[z, 4 - dy:12 - dy, 4 - dx:12 - dx])


def test_missing_sections_blank_or_duplicate_only_the_hit_sections():
  image, _ = _patch((200, 4, 4), seed=3)
  out = aug.missing_sections(np.random.default_rng(4), image, 0.3)
  changed = [z for z in range(200) if not np.array_equal(out[z], image[z])]
  blank = [z for z in changed if not out[z].any()]
  dup = [z for z in changed if z not in blank]
  for z in dup:
    np.testing.assert_array_equal(out[z], image[z - 1] if z > 0 else image[1])
  # 200 sections at p = 0.3: 60 expected, sd sqrt(200 * 0.3 * 0.7) = 6.5; both kinds occur
  assert 60 - 4 * 6.5 < len(changed) < 60 + 4 * 6.5 and blank and dup
  assert np.array_equal(out[[z for z in range(200) if z not in changed]],
                        image[[z for z in range(200) if z not in changed]])


def test_blur_sections_are_gaussian_blurs_of_their_section():
  image, _ = _patch((40, 16, 16), seed=4)
  out = aug.blur_sections(np.random.default_rng(6), image, 0.5, 2.0)
  changed = [z for z in range(40) if not np.array_equal(out[z], image[z])]
  assert 5 < len(changed) < 35
  for z in changed:
    # the blur's sigma is not returned: the best of a fine sigma grid reproduces the section
    errors = [np.abs(ndimage.gaussian_filter(image[z], s, mode="reflect", truncate=3.0) - out[z]).max()
              for s in np.linspace(0.01, 2.0, 200)]
    assert min(errors) < 0.02 and out[z].std() < image[z].std()


def test_brightness_contrast_gamma_and_noise():
  image = np.linspace(-2, 2, 1000, dtype=np.float32).reshape(10, 10, 10)
  for seed in range(5):
    out = aug.intensity(np.random.default_rng(seed), image, 0.3, 0.2, 0.0)
    c, b = np.polyfit(image.ravel(), out.ravel(), 1)
    assert 0.8 - 1e-5 <= c <= 1.2 + 1e-5 and abs(b) <= 0.3 + 1e-5
    np.testing.assert_allclose(out, image * np.float32(c) + np.float32(b), atol=1e-5)
    g = aug.intensity(np.random.default_rng(seed), image, 0.0, 0.0, 0.5)
    assert g.min() == pytest.approx(-2, abs=1e-6) and g.max() == pytest.approx(2, abs=1e-6)
    assert np.all(np.diff(g.ravel()) >= 0)  # monotone
    noisy = aug.gaussian_noise(np.random.default_rng(seed), image, 0.2)
    assert 0 <= (noisy - image).std() <= 0.2 * 1.1  # 1000 samples: sd of the estimate ~2%


def test_bad_strengths_are_user_errors():
  with pytest.raises(FFNError, match="--missing_section_prob must be a probability"):
    aug.AugmentConfig(missing_section_prob=1.5)
  with pytest.raises(FFNError, match="--contrast must be < 1"):
    aug.AugmentConfig(contrast=1.0)
  with pytest.raises(FFNError, match="--elastic_sigma must be > 0"):
    aug.AugmentConfig(elastic_sigma=0)


@pytest.fixture(scope="module")
def blocks(tmp_path_factory):
  """A 24^3 volume of 4^3-voxel blocks (ids 1..216), raw = 40 + 5 * (id % 40), and coordinates
  at x,y,z 3..20 (some near the edge, so the context is mirrored there)."""
  import tensorflow as tf
  root = tmp_path_factory.mktemp("blocks")
  z, y, x = np.meshgrid(*[np.arange(24) // 4] * 3, indexing="ij")
  labels = (z * 36 + y * 6 + x + 1).astype(np.int64)
  raw = (40 + 5 * (labels % 40)).astype(np.uint8)
  with h5py.File(root / "v.h5", "w") as f:
    f["raw"], f["stack"] = raw, labels
  centers = np.random.default_rng(0).integers(4, 20, size=(30, 3))
  with tf.io.TFRecordWriter(str(root / "c.tfr"), options="GZIP") as w:
    for c in centers:
      feature = {"center": tf.train.Feature(int64_list=tf.train.Int64List(value=c)),
                 "label_volume_name": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"v"]))}
      w.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
  return root, raw, labels


def _source(root, cfg=None, **kw) -> ExampleSource:
  return ExampleSource(str(root / "c.tfr"), f"v:{root / 'v.h5'}:raw", f"v:{root / 'v.h5'}:stack",
                       (5, 5, 5), (1, 1, 1), 100.0, 20.0, seed=3, augment_config=cfg, **kw)


def test_pipeline_rotation_is_applied_before_the_object_mask(blocks):
  """The example's labels are the object at the centre of the rotated labels, its image the rotated
  raw, normalised; permutation and reflection follow with their own RNG (unchanged stream)."""
  root, raw, labels = blocks
  cfg = aug.AugmentConfig(rotation_max_deg=180)
  plain, rotated = _source(root), _source(root, cfg)
  for i in range(6):
    row = rotated.coordinate(i)
    start = rotated.starts_xyz[row]  # x,y,z
    angle = aug.rotation_angle(np.random.default_rng([3, 3, i]), 180)
    m = cfg.margin_xy((7, 7, 7))
    lo = np.maximum(start - [m, m, 0], 0)
    hi = np.minimum(start + 7 + [m, m, 0], 24)
    sl = tuple(slice(a, b) for a, b in zip(lo[::-1], hi[::-1]))
    img, lab = aug.warp(raw[sl], labels[sl], (start - lo)[::-1], (7, 7, 7), angle)
    want_labels = examples.soften_labels(examples.object_mask(lab))
    want_image = (img - 100.0) / 20.0
    want_image, want_labels = examples.augment(np.random.default_rng([3, 1, i]),
                                               [want_image, want_labels])
    got_image, got_labels = rotated.example(i)
    np.testing.assert_array_equal(got_labels, want_labels)
    np.testing.assert_array_equal(got_image, want_image)
    # The centre object is the coordinate's (rotation keeps the centre voxel).
    c = start + 3
    assert got_labels[3, 3, 3] == np.float32(0.95) and labels[c[2], c[1], c[0]] > 0
    plain_image, plain_labels = plain.example(i)
    assert not np.array_equal(plain_image, got_image) or abs(math.degrees(angle)) < 1


def test_pipeline_all_augmentations_golden(blocks):
  """Every augmentation on: deterministic per index, patch-sized, finite, labels soft 0.05/0.95
  with the centre object set, and the fixed-seed example matches its golden figures."""
  root, _, _ = blocks
  source = _source(root, ALL)
  first = [source.example(i) for i in range(4)]
  for i, (image, labels) in enumerate(first):
    assert image.shape == labels.shape == (7, 7, 7) and image.dtype == np.float32
    assert np.isfinite(image).all() and set(np.unique(labels)) <= {np.float32(0.05), np.float32(0.95)}
    assert labels[3, 3, 3] == np.float32(0.95)
    again = source.example(i)
    np.testing.assert_array_equal(again[0], image)
    np.testing.assert_array_equal(again[1], labels)
  image, labels = first[0]
  assert int((labels > 0.5).sum()) == GOLDEN_EXAMPLE0["object_voxels"]
  assert float(image.astype(np.float64).sum()) == pytest.approx(GOLDEN_EXAMPLE0["image_sum"], abs=1e-3)


# Example 0 of the blocks volume with ALL (seed 3): objects voxels exact; the image sum of 343
# float32 values below ~10 in magnitude, each a few float32 ulps off on another machine.
GOLDEN_EXAMPLE0 = {"object_voxels": 104, "image_sum": 185.0173500403762}
