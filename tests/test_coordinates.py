"""build_coordinates: google's record order and bytes, TFRecord validity, balance, margin, CLI."""

from __future__ import annotations

import gzip
import sys

import h5py
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO_ROOT
from ffn.cli import main
from ffn.data import coordinates as coords
from ffn.errors import FFNError

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import google_reference  # noqa: E402

GOOGLE_SPEC = {"center": tf.io.FixedLenFeature(shape=[1, 3], dtype=tf.int64),
               "label_volume_name": tf.io.FixedLenFeature(shape=[1], dtype=tf.string)}


def _volumes() -> tuple[list[np.ndarray], list[str]]:
  rng = np.random.default_rng(7)
  a = rng.integers(0, 5, size=(12, 14, 16)).astype(np.uint8)
  b = rng.integers(2, 8, size=(10, 40, 30)).astype(np.uint8)
  b[b == 7] = 255
  a[:, :, :3] = 255
  return [a, b], ["first", "second_volume"]


def _sample(volumes, margin, seed):
  keys, shapes = coords.sample_keys(volumes, margin, seed)
  return coords.decode_keys(keys, shapes, margin)


def test_crc32c_known_value():
  assert coords.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
  assert coords.masked_crc(0) == 0xA282EAD8


def test_example_encoding_matches_protobuf():
  for center in ([0, 127, 128], [16383, 16384, 2 ** 21], [2 ** 40, 5, 1]):
    for name in (b"v", b"x" * 200):
      example = tf.train.Example(features=tf.train.Features(feature=dict(
          center=tf.train.Feature(int64_list=tf.train.Int64List(value=center)),
          label_volume_name=tf.train.Feature(bytes_list=tf.train.BytesList(value=[name])))))
      assert coords.encode_example(center, name) == example.SerializeToString(deterministic=True)


def test_same_records_and_bytes_as_google(tmp_path):
  volumes, names = _volumes()
  margin = (1, 2, 3)
  reference = google_reference.sample_coordinates_reference(volumes, margin, seed=11)
  volume, centers = _sample(volumes, margin, 11)
  assert [(int(v), tuple(c.tolist())) for v, c in zip(volume, centers)] == reference
  google_reference.write_coordinates_reference(str(tmp_path / "google.tfr"), reference, names)
  coords.write_coordinates(str(tmp_path / "ours.tfr"), volume, centers, names)
  with gzip.open(tmp_path / "google.tfr") as f1, gzip.open(tmp_path / "ours.tfr") as f2:
    assert f1.read() == f2.read()


def test_parses_with_google_feature_spec_and_balanced(tmp_path):
  volumes, names = _volumes()
  margin = (1, 2, 3)  # z, y, x
  volume, centers = _sample(volumes, margin, 3)
  path = str(tmp_path / "c.tfr")
  coords.CHUNK_RECORDS, saved = 1000, coords.CHUNK_RECORDS  # several chunks
  try:
    coords.write_coordinates(path, volume, centers, names)
  finally:
    coords.CHUNK_RECORDS = saved
  loaded, loaded_names = coords.load_coordinates(path)
  np.testing.assert_array_equal(loaded, centers)
  assert loaded_names == [names[v] for v in volume]
  for i, record in enumerate(tf.data.TFRecordDataset(path, compression_type="GZIP").take(300)):
    ex = tf.io.parse_single_example(record, GOOGLE_SPEC)
    assert ex["center"].numpy().tolist() == [centers[i].tolist()]
    assert ex["label_volume_name"].numpy().tolist() == [names[volume[i]].encode()]
  values = []
  for v, (x, y, z) in zip(volume, centers.tolist()):
    vol = volumes[v]
    assert 3 <= x < vol.shape[2] - 3 and 2 <= y < vol.shape[1] - 2 and 1 <= z < vol.shape[0] - 1
    values.append(int(vol[z, y, x]))
  counts = np.bincount(values, minlength=256)
  present = sorted(set(values))
  assert 255 not in present and present == list(range(7))
  assert len(set(counts[present].tolist())) == 1  # every partition value equally often
  # The largest group is used whole: each of its voxels exactly once.
  crop = [v[1:-1, 2:-2, 3:-3] for v in volumes]
  largest = max(present, key=lambda p: sum(int((c == p).sum()) for c in crop))
  assert counts[largest] == sum(int((c == largest).sum()) for c in crop)


def test_corrupted_record_is_rejected_by_tensorflow(tmp_path):
  volumes, names = _volumes()
  volume, centers = _sample(volumes, (0, 0, 0), 0)
  path = tmp_path / "c.tfr"
  coords.write_coordinates(str(path), volume, centers, names)
  raw = bytearray(gzip.decompress(path.read_bytes()))
  raw[12 + 20] ^= 0x01  # a byte of the first Example: its CRC no longer matches
  bad = tmp_path / "bad.tfr"
  bad.write_bytes(gzip.compress(bytes(raw)))
  with pytest.raises(tf.errors.DataLossError):
    for _ in tf.data.TFRecordDataset(str(bad), compression_type="GZIP"):
      pass


def test_seed_determinism_and_zero_margin():
  volumes, _ = _volumes()
  v1, c1 = _sample(volumes, (0, 0, 0), 5)
  v2, c2 = _sample(volumes, (0, 0, 0), 5)
  v3, c3 = _sample(volumes, (0, 0, 0), 6)
  np.testing.assert_array_equal(c1, c2)
  assert not np.array_equal(c1, c3) and c1.shape == c3.shape
  assert c1[:, 0].min() == 0 and c1[:, 0].max() == 29  # margin 0 keeps the whole axis


def test_sampling_errors():
  with pytest.raises(FFNError, match="nothing to sample"):
    coords.sample_keys([np.full((4, 4, 4), 255, np.uint8)], (0, 0, 0), 0)
  with pytest.raises(FFNError, match="leaves nothing"):
    coords.sample_keys([np.zeros((4, 9, 9), np.uint8)], (2, 0, 0), 0)


def _cli(*args: str) -> int:
  return main(["build_coordinates", *args])


def test_cli_round_trip_multiple_volumes(tmp_path):
  volumes, names = _volumes()
  for vol, name in zip(volumes, names):
    with h5py.File(tmp_path / f"{name}.h5", "w") as f:
      f["af"] = vol
  spec = ",".join(f"{n}:{tmp_path}/{n}.h5:af" for n in names)
  out = tmp_path / "coords.tfr"
  assert _cli("--partition_volumes", spec, "--coordinate_output", str(out), "--margin", "1,2,3",
              "--seed", "4") == 0
  centers, loaded_names = coords.load_coordinates(str(out))
  volume, expected = _sample(volumes, (1, 2, 3), 4)
  np.testing.assert_array_equal(centers, expected)
  assert loaded_names == [names[v] for v in volume]


@pytest.mark.parametrize("problem", ["missing_dataset", "all_ignored", "bad_margin", "missing_file"])
def test_cli_errors(tmp_path, capsys, problem):
  with h5py.File(tmp_path / "af.h5", "w") as f:
    f["af"] = np.full((6, 6, 6), 255 if problem == "all_ignored" else 1, dtype=np.uint8)
  path = tmp_path / ("nope.h5" if problem == "missing_file" else "af.h5")
  dataset = "nope" if problem == "missing_dataset" else "af"
  margin = "1,1" if problem == "bad_margin" else "1,1,1"
  rc = _cli("--partition_volumes", f"v:{path}:{dataset}", "--coordinate_output",
            str(tmp_path / "c.tfr"), "--margin", margin)
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("ffn build_coordinates: error:")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["af.h5"]  # no output, no temporary file


def _write_tf(path, payloads, compression):
  with tf.io.TFRecordWriter(str(path), options=tf.io.TFRecordOptions(compression_type=compression)) as w:
    for payload in payloads:
      w.write(payload)


@pytest.mark.parametrize("compression", ["GZIP", ""])
def test_load_coordinates_any_entry_order_and_extra_features(tmp_path, compression):
  centers = np.array([[5, 300, 20000], [0, 1, 2], [2 ** 33, 7, 129]])
  names = ["b", "a_long_volume_name", "b"]
  payloads = []
  for i, (center, name) in enumerate(zip(centers.tolist(), names)):
    canonical = tf.train.Example.FromString(coords.encode_example(center, name.encode()))
    # Entries written name-first by hand: valid protobuf, the order google's files may have.
    entries = list(canonical.features.feature.items())[::-1 if i % 2 else 1]
    body = b"".join(coords._field(1, coords._field(1, k.encode()) + coords._field(2, v.SerializeToString()))
                    for k, v in entries)
    payloads.append(coords._field(1, body))
  _write_tf(tmp_path / "mixed.tfr", payloads, compression)
  loaded, loaded_names = coords.load_coordinates(str(tmp_path / "mixed.tfr"))
  np.testing.assert_array_equal(loaded, centers)
  assert loaded_names == names
  # An extra feature is ignored.
  extra = []
  for center, name in zip(centers.tolist(), names):
    ex = tf.train.Example.FromString(coords.encode_example(center, name.encode()))
    ex.features.feature["weight"].float_list.value.append(1.0)
    extra.append(ex.SerializeToString())
  _write_tf(tmp_path / "extra.tfr", extra, compression)
  loaded, loaded_names = coords.load_coordinates(str(tmp_path / "extra.tfr"))
  np.testing.assert_array_equal(loaded, centers)
  assert loaded_names == names


def test_load_coordinates_errors(tmp_path):
  with pytest.raises(FFNError, match="cannot read"):
    coords.load_coordinates(str(tmp_path / "missing.tfr"))
  (tmp_path / "junk.tfr").write_bytes(b"not a tfrecord file at all")
  with pytest.raises(FFNError, match="not a coordinate TFRecord"):
    coords.load_coordinates(str(tmp_path / "junk.tfr"))
