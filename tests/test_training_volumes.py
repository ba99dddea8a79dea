"""Several training volumes: sampling weights (--volume_weights), per-volume normalisation (google's
--image_offset_scale_map) and their flags through `ffn train`."""

from __future__ import annotations

import numpy as np
import pytest

from ffn.data.coordinates import write_coordinates
from ffn.errors import FFNError
from ffn.io.volumes import write_h5
from ffn.training.data import ExampleSource, parse_offset_scale_map, parse_volume_weights

NAMES = ("a", "b", "c")
RAW = {"a": 10, "b": 100, "c": 200}  # each volume's constant raw value
COUNTS = {"a": 50, "b": 20, "c": 5}  # coordinates per volume


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
  """Three 12^3 volumes of constant raw (RAW) with one object, and COUNTS coordinates each."""
  root = tmp_path_factory.mktemp("volumes")
  for name in NAMES:
    write_h5(str(root / f"{name}.h5"), "raw", np.full((12, 12, 12), RAW[name], np.uint8))
    write_h5(str(root / f"{name}.h5"), "stack", np.ones((12, 12, 12), np.int64))
  rng = np.random.default_rng(0)
  which = np.concatenate([np.full(COUNTS[n], i) for i, n in enumerate(NAMES)])
  write_coordinates(str(root / "c.tfr.gz"), which, rng.integers(4, 8, (len(which), 3)), list(NAMES))
  specs = {kind: ",".join(f"{n}:{root / n}.h5:{kind}" for n in NAMES) for kind in ("raw", "stack")}
  return root, specs


def _source(volumes, **kw) -> ExampleSource:
  root, specs = volumes
  kw.setdefault("image_mean", 128.0)
  kw.setdefault("image_stddev", 32.0)
  return ExampleSource(str(root / "c.tfr.gz"), specs["raw"], specs["stack"], (5, 5, 5), (1, 1, 1),
                       seed=7, **kw)


def _volume_of(source: ExampleSource, index: int) -> str:
  return source.names[source.coordinate(index)]


def test_default_sampling_follows_the_coordinate_counts(volumes):
  source = _source(volumes)
  epoch = [_volume_of(source, i) for i in range(len(source))]
  assert {n: epoch.count(n) for n in NAMES} == COUNTS  # one epoch: every coordinate once


def test_volume_weights_sample_volumes_in_the_given_ratio(volumes):
  """4000 examples with weights 1:2:5 (coordinate counts 50:20:5 do not matter): each volume's
  count is within 4 binomial standard deviations of 4000 * w / 8 (a false failure has
  probability < 1e-4; the seed is fixed, so the test is deterministic)."""
  source = _source(volumes, volume_weights="a:1,b:2,c:5")
  n = 4000
  picks = [_volume_of(source, i) for i in range(n)]
  for name, w in zip(NAMES, (1, 2, 5)):
    p = w / 8
    assert abs(picks.count(name) - n * p) < 4 * np.sqrt(n * p * (1 - p)), (name, picks.count(name))
  # Within a volume the coordinates are drawn uniformly: all 5 of c's appear.
  rows_c = {source.coordinate(i) for i in range(n) if _volume_of(source, i) == "c"}
  assert len(rows_c) == COUNTS["c"]
  # Indexed: the same position gives the same row in a fresh source (resume after restart).
  again = _source(volumes, volume_weights="a:1,b:2,c:5")
  assert [again.coordinate(i) for i in (0, 17, 3999)] == [source.coordinate(i) for i in (0, 17, 3999)]
  # Weight 0 leaves a volume out.
  no_a = _source(volumes, volume_weights="a:0,b:1,c:1")
  assert "a" not in {_volume_of(no_a, i) for i in range(300)}


def test_per_volume_normalisation(volumes):
  """google's (raw - offset) / scale with each volume's own offset and scale; volumes not in the
  map use --image_mean / --image_stddev."""
  source = _source(volumes, image_offset_scale_map="a:10:2,c:150:25")
  want = {"a": (10 - 10) / 2, "b": (100 - 128) / 32, "c": (200 - 150) / 25}
  seen = set()
  for i in range(40):
    image, labels = source.example(i)
    name = _volume_of(source, i)
    seen.add(name)
    np.testing.assert_array_equal(image, np.float32(want[name]))
    assert np.all(labels == np.float32(0.95))
  assert seen == set(NAMES)
  # The map alone is enough when it covers every volume.
  full = _source(volumes, image_mean=None, image_stddev=None,
                 image_offset_scale_map="a:0:1,b:0:1,c:0:1")
  image, _ = full.example(0)
  assert image.flat[0] == RAW[_volume_of(full, 0)]


def test_bad_multi_volume_flags_are_user_errors(volumes):
  with pytest.raises(FFNError, match=r"volume b: no offset and scale"):
    _source(volumes, image_mean=None, image_stddev=None, image_offset_scale_map="a:0:1,c:0:1")
  with pytest.raises(FFNError, match=r"volumes \['z'\] are not in --data_volumes"):
    _source(volumes, image_offset_scale_map="z:0:1")
  with pytest.raises(FFNError, match=r"no weight for volumes \['c'\]"):
    _source(volumes, volume_weights="a:1,b:1")
  with pytest.raises(FFNError, match=r"volumes \['q'\] have no usable coordinate"):
    _source(volumes, volume_weights="a:1,b:1,c:1,q:2")
  with pytest.raises(FFNError, match="expected volume_name:offset:scale"):
    parse_offset_scale_map("a:1")
  with pytest.raises(FFNError, match="scale must be positive"):
    parse_offset_scale_map("a:1:0")
  with pytest.raises(FFNError, match="expected volume_name:weight"):
    parse_volume_weights("a:-1")
  with pytest.raises(FFNError, match="at least one weight must be positive"):
    parse_volume_weights("a:0,b:0")
  assert parse_volume_weights("x:y.h5:1.5") == {"x:y.h5": 1.5}  # the last ':' separates the weight


def test_train_cli_passes_the_flags(volumes, tmp_path, capsys):
  """`ffn train` with all three volumes, weights, a partial offset/scale map and augmentations:
  runs its steps, records the flags, and a bad weight is one line and exit 2."""
  import json
  from ffn.cli import main
  root, specs = volumes
  flags = ["train", "--train_coords", str(root / "c.tfr.gz"), "--data_volumes", specs["raw"],
           "--label_volumes", specs["stack"], "--model_name", "convstack_3d",
           "--model_args", '{"depth": 1, "fov_size": [5, 5, 5], "deltas": [1, 1, 1]}',
           "--image_mean", "128", "--image_stddev", "32", "--image_offset_scale_map", "a:10:2",
           "--volume_weights", "a:1,b:1,c:2", "--rotation_max_deg", "30", "--noise_stddev", "0.1",
           "--missing_section_prob", "0.1", "--batch_size", "2", "--max_steps", "3",
           "--train_dir", str(tmp_path / "run")]
  assert main(flags) == 0
  saved = json.loads((tmp_path / "run" / "train_flags.json").read_text())
  assert saved["volume_weights"] == "a:1,b:1,c:2" and saved["image_offset_scale_map"] == "a:10:2"
  assert saved["rotation_max_deg"] == 30 and saved["noise_stddev"] == 0.1
  capsys.readouterr()
  bad = flags[:flags.index("--volume_weights") + 1] + ["a:1,b:x"] + flags[flags.index("--volume_weights") + 2:]
  assert main(bad[:-1] + [str(tmp_path / "bad")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--volume_weights 'b:x'" in err[0]


def test_self_training_recipe(tmp_path, sample_fib25, capsys):
  """README "Self-training": an FFN result (here the shipped bodies of a 28^3 box, renumbered
  uint64 as inference writes them) -> `ffn prepare --labels seg-x_y_z.npz` -> aligned image, labels
  and coordinates of that box -> training together with the ground-truth volume (two coordinate
  files, --volume_weights): every self-training example is the ground truth's at the same place."""
  import h5py
  from ffn.cli import main
  from ffn.inference import storage
  from ffn.training import examples
  with h5py.File(sample_fib25 / "training_sample2_crop.h5", "r") as f:
    raw, gt = f["raw"][:48, :48, :48], f["stack"][:48, :48, :48]
  write_h5(str(tmp_path / "image.h5"), "raw", raw)
  write_h5(str(tmp_path / "gt.h5"), "stack", gt)
  corner_xyz = (10, 12, 14)
  box = (slice(14, 42), slice(12, 40), slice(10, 38))  # z,y,x of the 28^3 result
  ids, inverse = np.unique(gt[box], return_inverse=True)
  renumbered = np.random.default_rng(1).choice(2 ** 40, ids.size, replace=False).astype(np.uint64)
  result = renumbered[inverse.reshape(28, 28, 28)]
  result[gt[box] == 0] = 0
  npz = storage.segmentation_path(str(tmp_path / "results"), corner_xyz[::-1])
  storage.save_subvolume(result, {}, npz)
  small = ["--lom_radius", "4,4,4", "--min_size", "100", "--thresholds", "0.5"]
  assert main(["prepare", "--image", f"{tmp_path}/image.h5:raw", "--labels", npz, "--volume_name",
               "self", "--output_dir", str(tmp_path / "self")] + small) == 0
  assert f"--data_volumes self:{tmp_path}/self/image.h5:raw" in capsys.readouterr().out
  # The ground truth's coordinates: a few random ones (its preparation is tested elsewhere).
  from ffn.data.coordinates import write_coordinates
  write_coordinates(str(tmp_path / "gt.tfr.gz"), np.zeros(50, np.int64),
                    np.random.default_rng(2).integers(7, 41, (50, 3)), ["gt"])
  with h5py.File(tmp_path / "self" / "image.h5", "r") as f:
    np.testing.assert_array_equal(f["raw"][()], raw[box])
  with h5py.File(tmp_path / "self" / "labels.h5", "r") as f:
    assert f["stack"].dtype == np.int64
    np.testing.assert_array_equal(f["stack"][()], result.astype(np.int64))
  source = ExampleSource(
      f"{tmp_path}/gt.tfr.gz,{tmp_path}/self/coordinates.tfrecord.gz",
      f"gt:{tmp_path}/image.h5:raw,self:{tmp_path}/self/image.h5:raw",
      f"gt:{tmp_path}/gt.h5:stack,self:{tmp_path}/self/labels.h5:stack", (9, 9, 9), (2, 2, 2),
      128.0, 32.0, permutable_axes=(), reflectable_axes=(), volume_weights="gt:1,self:1")
  assert set(source.names) == {"gt", "self"}
  checked = 0
  for i in range(60):
    row = source.coordinate(i)
    if source.names[row] != "self":
      continue
    x, y, z = source.starts_xyz[row] + corner_xyz  # the same place in the ground-truth volume
    where = (slice(z, z + 13), slice(y, y + 13), slice(x, x + 13))
    image, labels = source.example(i)
    np.testing.assert_array_equal(labels, examples.soften_labels(examples.object_mask(gt[where])))
    np.testing.assert_array_equal(image, (raw[where].astype(np.float32) - 128.0) / 32.0)
    checked += 1
  assert checked > 15
