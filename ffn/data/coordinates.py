"""Balanced training coordinates (google/ffn ``build_coordinates.py``, same file format).

Every voxel of a partition volume (see :mod:`ffn.data.partitions`) is a candidate training centre,
except the ignore value 255 and a ``margin`` at the border. Candidates are grouped by partition
value over all volumes; every group is shuffled and resampled (repeated cyclically) to the size of
the largest group, and the union is shuffled. Each centre becomes one ``tf.train.Example`` with
``center`` (int64 [x, y, z], voxels) and ``label_volume_name`` (bytes) in a GZIP TFRecord file --
the format google/ffn's ``train.py`` reads.

Speed: instead of Python lists of tuples and one TensorFlow ``Example`` object per record, the
candidates are int64 keys sorted by partition value, and the records are assembled in numpy from
byte templates (one per volume name and varint widths of x, y, z), with the TFRecord framing and
its masked CRC32C computed vectorised. The uncompressed record stream is byte-identical to what
``tf.io.TFRecordWriter`` writes for ``tf.train.Example.SerializeToString(deterministic=True)``
(map entries sorted: ``center`` first; protobuf's default order of the two entries varies from
process to process), and with the same seed the record order equals google's algorithm run under
``np.random.seed(seed)``.
"""

from __future__ import annotations

import argparse
import logging
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from ffn.errors import FFNError
from ffn.io.atomic import atomic_path
from ffn.io.volumes import Volume, check_dtype, parse_named_specs
from ffn.progress import Progress

IGNORE_PARTITION = 255
GZIP_LEVEL = 6  # zlib's default, the level tf.io.TFRecordWriter uses for GZIP
CHUNK_RECORDS = 1 << 20

_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Sampling


def sample_keys(partitions: Sequence[np.ndarray], margin_zyx: Sequence[int],
                seed: int) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
  """Balanced, shuffled candidate centres, in google's order for ``np.random.seed(seed)``.

  Args:
    partitions: uint8 partition volumes, z,y,x.
    margin_zyx: voxels to skip at each border, **z,y,x** (google's order for this flag).
    seed: seed of the legacy numpy generator (``np.random.RandomState``).

  Returns:
    (keys, cropped shapes): int64 keys ``offset[v] + flat index`` into the margin-cropped volume
    ``v`` (offsets are the cumulative sizes of the cropped volumes), and those shapes (z,y,x).
  """
  margin = [int(m) for m in margin_zyx]
  if len(margin) != 3 or min(margin) < 0:
    raise FFNError(f"margin: expected 3 non-negative integers z,y,x, got {list(margin_zyx)}")
  crop = tuple(slice(m, -m if m else None) for m in margin)
  groups: dict[int, list[np.ndarray]] = {}  # partition value -> key arrays, volume order
  shapes: list[tuple[int, int, int]] = []
  offset = 0
  for part in partitions:
    cropped = part[crop]
    if cropped.size == 0:
      raise FFNError(f"margin {margin} (z,y,x) leaves nothing of a volume of shape {part.shape} (z,y,x)")
    shapes.append(cropped.shape)
    flat = np.ascontiguousarray(cropped).reshape(-1)
    counts = np.bincount(flat, minlength=256)
    order = np.argsort(flat, kind="stable")  # grouped by value, ascending index within a value
    starts = np.concatenate([[0], np.cumsum(counts)])
    for value in np.flatnonzero(counts):
      if value == IGNORE_PARTITION:
        continue
      groups.setdefault(int(value), []).append(order[starts[value]:starts[value + 1]] + offset)
    offset += flat.size
  if not groups:
    raise FFNError("no voxel with a partition value other than 255 inside the margin: nothing to sample")
  merged = {value: np.concatenate(keys) for value, keys in groups.items()}
  max_count = max(len(keys) for keys in merged.values())
  rng = np.random.RandomState(seed)
  keys = np.concatenate([np.resize(keys[rng.permutation(len(keys))], max_count)
                         for keys in merged.values()])
  rng.shuffle(keys)
  _log.info("partition counts: %s; %d records (%d values x %d)",
            {v: len(k) for v, k in merged.items()}, keys.size, len(merged), max_count)
  return keys, shapes


def decode_keys(keys: np.ndarray, shapes: Sequence[Sequence[int]],
                margin_zyx: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """Keys from :func:`sample_keys` -> (volume index int64 [N], centres int64 [N, 3] as x,y,z)."""
  sizes = np.array([int(np.prod(s)) for s in shapes], dtype=np.int64)
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  volume = np.searchsorted(offsets, keys, side="right") - 1
  centers = np.empty((keys.size, 3), dtype=np.int64)
  for v, shape in enumerate(shapes):
    sel = volume == v
    z, y, x = np.unravel_index(keys[sel] - offsets[v], tuple(shape))
    centers[sel] = np.stack([x + margin_zyx[2], y + margin_zyx[1], z + margin_zyx[0]], axis=1)
  return volume, centers


# ----------------------------------------------------------------------------------------------
# tf.train.Example and TFRecord encoding


def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    byte = value & 0x7F
    value >>= 7
    if value:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
  """A length-delimited protobuf field."""
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _name_entry(volume_name: bytes) -> bytes:
  """The ``label_volume_name`` map entry of Features (Feature.bytes_list = 1)."""
  return _field(1, _field(1, b"label_volume_name") + _field(2, _field(1, _field(1, volume_name))))


def encode_example(center_xyz: Sequence[int], volume_name: bytes) -> bytes:
  """Serialises one coordinate ``tf.train.Example`` like protobuf's deterministic serialisation.

  The packed varints of the centre are the last bytes before the volume-name entry.
  """
  packed = b"".join(_varint(int(v)) for v in center_xyz)
  center = _field(1, b"center") + _field(2, _field(3, _field(1, packed)))  # Feature.int64_list = 3
  return _field(1, _field(1, center) + _name_entry(volume_name))


def _crc_table() -> np.ndarray:
  """Byte table of CRC-32C (Castagnoli, reflected polynomial 0x82F63B78)."""
  crc = np.arange(256, dtype=np.uint32)
  for _ in range(8):
    crc = np.where(crc & 1, (crc >> 1) ^ np.uint32(0x82F63B78), crc >> 1).astype(np.uint32)
  return crc


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
  """CRC-32C of ``data`` (byte-at-a-time; for templates and tests)."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = int(_CRC_TABLE[(crc ^ byte) & 0xFF]) ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc(crc: np.ndarray | int) -> np.ndarray | int:
  """TFRecord's CRC masking: rotate right by 15 and add 0xa282ead8 (mod 2^32)."""
  if isinstance(crc, int):
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF
  crc = crc.astype(np.uint32)
  return ((crc >> np.uint32(15)) | (crc << np.uint32(17))) + np.uint32(0xA282EAD8)


def _byte_crc_tables(length: int, positions: Sequence[int]) -> list[np.ndarray]:
  """For each position p: CRC register contribution of a byte at p in a ``length``-byte message.

  CRC without the initial/final inversion is linear (GF(2)), so the CRC of a record that differs
  from a template only at ``positions`` is the template's CRC xor these contributions of the
  differing bytes.
  """
  tables = []
  for p in positions:
    reg = _CRC_TABLE.copy()  # register right after the byte at p (the register before it is 0)
    for _ in range(length - 1 - p):
      reg = _CRC_TABLE[reg & 0xFF] ^ (reg >> np.uint32(8))
    tables.append(reg)
  return tables


def _varint_width(values: np.ndarray) -> np.ndarray:
  width = np.ones(values.shape, dtype=np.int64)
  for k in range(1, 10):
    width += values >= (1 << (7 * k))
  return width


def encode_records(volume: np.ndarray, centers_xyz: np.ndarray, names: Sequence[str]) -> bytes:
  """The framed TFRecord bytes (uncompressed) of a batch of coordinate Examples, in order.

  Each record: length (uint64 LE), masked CRC32C of the length, the serialised Example, masked
  CRC32C of the Example. ``centers_xyz`` must be non-negative.
  """
  n = volume.size
  if n == 0:
    return b""
  if np.any(centers_xyz < 0):
    raise FFNError("coordinates must be non-negative")
  widths = _varint_width(centers_xyz)
  group = volume * 1000 + (widths[:, 0] - 1) * 100 + (widths[:, 1] - 1) * 10 + widths[:, 2] - 1
  uniq, inverse = np.unique(group, return_inverse=True)
  # Build each group's template, then fill the varint bytes and CRCs of all its rows at once.
  pieces = []
  for g, code in enumerate(uniq.tolist()):
    rows = np.flatnonzero(inverse == g)
    v, wx, wy, wz = code // 1000, code // 100 % 10 + 1, code // 10 % 10 + 1, code % 10 + 1
    probe = [(1 << (7 * (w - 1))) for w in (wx, wy, wz)]  # smallest value of each width
    name = names[v].encode("utf-8")
    template = encode_example(probe, name)
    tmpl = np.frombuffer(template, dtype=np.uint8)
    col = packed_at = len(template) - len(_name_entry(name)) - (wx + wy + wz)
    data = np.tile(tmpl, (rows.size, 1))
    for axis, w in enumerate((wx, wy, wz)):
      vals = centers_xyz[rows, axis]
      for k in range(w):
        data[:, col] = ((vals >> (7 * k)) & 0x7F) | (0x80 if k < w - 1 else 0)
        col += 1
    positions = list(range(packed_at, col))
    crc = np.full(rows.size, crc32c(template), dtype=np.uint32)
    for p, table in zip(positions, _byte_crc_tables(len(template), positions)):
      crc ^= table[data[:, p] ^ tmpl[p]]
    header = np.uint64(len(template)).tobytes()
    record = np.empty((rows.size, len(template) + 16), dtype=np.uint8)
    record[:, :8] = np.frombuffer(header, dtype=np.uint8)
    record[:, 8:12] = np.frombuffer(np.uint32(masked_crc(crc32c(header))).tobytes(), dtype=np.uint8)
    record[:, 12:-4] = data
    record[:, -4:] = masked_crc(crc).astype("<u4").view(np.uint8).reshape(-1, 4)
    pieces.append((rows, record))
  # Rows of a zero-padded matrix, cut to each record's length, concatenated in record order.
  width = max(record.shape[1] for _, record in pieces)
  matrix = np.zeros((n, width), dtype=np.uint8)
  sizes = np.empty(n, dtype=np.int64)
  for rows, record in pieces:
    matrix[rows, :record.shape[1]] = record
    sizes[rows] = record.shape[1]
  out = matrix[np.arange(width) < sizes[:, None]]
  return out.tobytes()


def write_coordinates(path: str, volume: np.ndarray, centers_xyz: np.ndarray,
                      names: Sequence[str], progress: bool = False) -> None:
  """Writes coordinate Examples to a GZIP TFRecord file atomically (temporary file + rename).

  ``volume``: index into ``names`` per record; ``centers_xyz``: int64 [N, 3], x,y,z voxels.
  Chunks are encoded while the previous one is compressed in a second thread (zlib releases the
  GIL), so both cores are busy.
  """
  compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # wbits 31: gzip container
  meter = Progress(volume.size, "coordinates", unit="records") if progress else None
  with atomic_path(path) as tmp, open(tmp, "wb") as f, ThreadPoolExecutor(1) as pool:
    pending = None
    for start in range(0, volume.size, CHUNK_RECORDS):
      stop = min(start + CHUNK_RECORDS, volume.size)
      raw = encode_records(volume[start:stop], centers_xyz[start:stop], names)
      if pending is not None:
        pending.result()
      pending = pool.submit(lambda data: f.write(compressor.compress(data)), raw)
      if meter is not None:
        meter.update(stop - start)
    if pending is not None:
      pending.result()
    f.write(compressor.flush())
  if meter is not None:
    meter.close()


# ----------------------------------------------------------------------------------------------
# Reading


def load_coordinates(path: str) -> tuple[np.ndarray, list[str]]:
  """Reads a coordinate TFRecord file (ours or google's; GZIP or uncompressed).

  Uses TensorFlow's reader (which checks the record CRCs) and parser with google's feature spec,
  in batches: about 2-3 us per record (14.2M records: 27 s, 1.7 GB peak on the benchmark machine).

  Returns:
    (centres int64 [N, 3] as x,y,z in voxels, the volume name of each record; equal names are
    the same str object).
  """
  import tensorflow as tf
  try:
    with open(path, "rb") as f:
      magic = f.read(2)
  except OSError as e:
    raise FFNError(f"{path}: cannot read coordinate file ({e.strerror})") from None
  spec = {"center": tf.io.FixedLenFeature([1, 3], tf.int64),
          "label_volume_name": tf.io.FixedLenFeature([1], tf.string)}
  centers, names = [], []
  interned: dict[bytes, str] = {}
  dataset = tf.data.TFRecordDataset(path, compression_type="GZIP" if magic == b"\x1f\x8b" else "",
                                    buffer_size=1 << 24)
  try:
    for records in dataset.batch(1 << 16):
      parsed = tf.io.parse_example(records, spec)
      centers.append(parsed["center"].numpy().reshape(-1, 3))
      names.extend(interned.setdefault(n, n.decode("utf-8"))
                   for n in parsed["label_volume_name"].numpy().reshape(-1))
  except tf.errors.OpError as e:
    raise FFNError(f"{path}: not a coordinate TFRecord file ({e.message.splitlines()[0]})") from None
  if not centers:
    return np.zeros((0, 3), dtype=np.int64), []
  return np.concatenate(centers).astype(np.int64), names


# ----------------------------------------------------------------------------------------------
# Command line (google/ffn flags)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--partition_volumes", required=True,
                      help="comma-separated name:path.h5:dataset partition volumes (from "
                           "compute_partitions); the names must match the training --data_volumes")
  parser.add_argument("--coordinate_output", required=True,
                      help="output GZIP TFRecord file of tf.train.Example coordinates")
  parser.add_argument("--margin", required=True,
                      help="voxels to exclude at each border, as z,y,x (NOTE: z,y,x, google's order "
                           "for this flag; one value: all axes); normally the FFN FoV radius + deltas")
  parser.add_argument("--seed", type=int, default=0,
                      help="random seed of the resampling and shuffling (default 0)")


def run(args: argparse.Namespace) -> int:
  specs = parse_named_specs(args.partition_volumes)
  try:
    margin = [int(m) for m in args.margin.replace(" ", "").split(",") if m]
  except ValueError:
    raise FFNError(f"margin: expected integers z,y,x, got {args.margin!r}") from None
  if len(margin) == 1:
    margin *= 3
  if len(margin) != 3 or min(margin) < 0:
    raise FFNError(f"margin: expected 3 non-negative integers z,y,x, got {args.margin!r}")
  names, volumes = [], []
  for name, spec in specs.items():
    with Volume(spec) as vol:
      check_dtype(str(spec), vol.dtype, "ui")
      data = vol.read_all()
    if data.size and int(data.max()) > 255:
      raise FFNError(f"{spec}: partition values must be 0..255, found {int(data.max())}")
    names.append(name)
    volumes.append(data.astype(np.uint8, copy=False))
  keys, shapes = sample_keys(volumes, margin, args.seed)
  del volumes
  volume, centers = decode_keys(keys, shapes, margin)
  del keys
  write_coordinates(args.coordinate_output, volume, centers, names, progress=True)
  _log.info("wrote %d coordinates to %s", volume.size, args.coordinate_output)
  return 0
