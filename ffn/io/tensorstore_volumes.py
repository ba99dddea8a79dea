"""Volumes too large for one array: Zarr, N5 and Neuroglancer precomputed (TensorStore), HDF5.

Input volumes (any ``zarr://``, ``n5://``, ``precomputed://`` or TensorStore JSON volume spec of
:mod:`ffn.io.volumes`) are opened read-only by :func:`open_volume_array`, as a lazy array that
:class:`ffn.io.volumes.Volume` reads box by box.

Output specs (what ``--output`` of ``ffn stitch`` accepts):

* ``path.h5:dataset`` -- HDF5 (h5py): uint64, chunked, gzip-compressed, z,y,x;
* ``zarr://path`` -- a Zarr v2 array (TensorStore ``zarr`` driver): uint64, blosc/zstd, z,y,x;
* ``precomputed://path`` -- a Neuroglancer precomputed segmentation layer (TensorStore
  ``neuroglancer_precomputed`` driver): uint64, ``compressed_segmentation`` encoding, one scale,
  optionally sharded; ``ffn serve`` on the parent folder shows it in Neuroglancer;
* a TensorStore JSON spec (``{"driver": "zarr" | "neuroglancer_precomputed", "kvstore": ...}``)
  whose kvstore is a local path (``"file:///..."``, ``{"driver": "file", "path": ...}`` or a plain
  path): the same as the two above.

Coordinates are absolute voxels, arrays z,y,x (:mod:`ffn.axes`). A volume covers a box of the
whole dataset starting at ``offset_zyx``: precomputed stores it as ``voxel_offset`` (x,y,z; chunk
files are named by absolute voxel ranges, as the format requires), Zarr in ``.zattrs`` and HDF5
in the dataset attribute ``voxel_offset_xyz`` (both x,y,z). Reads and writes take absolute
corners; :func:`read_labels` reads any of the three back (the box or everything).

Writing by several processes at once is safe when each writes whole *write units*
(:meth:`LabelsLayout.write_unit_zyx`: a storage chunk, or a shard when sharded), which is how the
blockwise writers use it. TensorStore runs here with its chunk cache off, so a process holds only
what it writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import h5py
import numpy as np

from ffn.errors import FFNError
from ffn.io.atomic import atomic_path, check_writable_dir
from ffn.io.volumes import H5_SUFFIXES, h5_has_dataset, open_h5_dataset, parse_spec

FORMATS = ("h5", "zarr", "precomputed")
_TS_DRIVERS = {"zarr": "zarr", "neuroglancer_precomputed": "precomputed"}


@dataclasses.dataclass(frozen=True)
class LabelsSpec:
  """A parsed output spec: ``format`` one of :data:`FORMATS`; ``dataset`` only for HDF5."""
  format: str
  path: str
  dataset: str | None = None

  def __str__(self) -> str:
    if self.format == "h5":
      return f"{self.path}:{self.dataset}"
    return f"{self.format}://{self.path}"

  def at(self, path: str) -> "LabelsSpec":
    """The same kind of volume at another path (e.g. a staging copy)."""
    return dataclasses.replace(self, path=path)


def _kvstore_path(kvstore: Any, text: str) -> str:
  if isinstance(kvstore, str):
    path = kvstore[len("file://"):] if kvstore.startswith("file://") else kvstore
    if "://" in path:
      raise FFNError(f"output spec {text}: only local file kvstores are supported, got {kvstore!r}")
    return path
  if isinstance(kvstore, dict) and kvstore.get("driver") == "file" and kvstore.get("path"):
    return str(kvstore["path"])
  raise FFNError(f"output spec {text}: only local file kvstores are supported, got {kvstore!r}")


def parse_labels_spec(text: str) -> LabelsSpec:
  """Parses an output spec (module docstring); FFNError for anything else."""
  if not text or not isinstance(text, str):
    raise FFNError(f"empty output spec {text!r}")
  stripped = text.strip()
  if stripped.startswith("{"):
    try:
      data = json.loads(stripped)
    except ValueError as e:
      raise FFNError(f"output spec {text}: not valid JSON ({e})") from None
    driver = data.get("driver") if isinstance(data, dict) else None
    if driver not in _TS_DRIVERS:
      raise FFNError(f"output spec {text}: driver must be one of {', '.join(_TS_DRIVERS)}, "
                     f"got {driver!r}")
    if "kvstore" not in data:
      raise FFNError(f"output spec {text}: no kvstore")
    return LabelsSpec(_TS_DRIVERS[driver], _kvstore_path(data["kvstore"], text))
  for fmt in ("zarr", "precomputed"):
    prefix = f"{fmt}://"
    if stripped.startswith(prefix):
      path = stripped[len(prefix):]
      if not path:
        raise FFNError(f"output spec {text}: no path after {prefix}")
      return LabelsSpec(fmt, path)
  if "://" in stripped:
    raise FFNError(f"output spec {text}: unknown scheme (expected zarr://, precomputed:// or "
                   "path.h5:dataset)")
  spec = parse_spec(stripped)
  if spec.dataset is None or spec.name is not None or not spec.path.lower().endswith(H5_SUFFIXES):
    raise FFNError(f"output spec {text}: expected path.h5:dataset, zarr://path or precomputed://path")
  return LabelsSpec("h5", spec.path, spec.dataset)


@dataclasses.dataclass(frozen=True)
class LabelsLayout:
  """Geometry of a new label volume. ``shape_zyx``/``offset_zyx``: the box it covers (voxels);
  ``chunk_zyx``: storage chunk; ``resolution_nm_xyz``: voxel size (precomputed only);
  ``shard_chunks_zyx``: storage chunks per shard along each axis, powers of two (precomputed
  only; None = not sharded)."""
  shape_zyx: tuple[int, int, int]
  offset_zyx: tuple[int, int, int] = (0, 0, 0)
  chunk_zyx: tuple[int, int, int] = (64, 64, 64)
  resolution_nm_xyz: tuple[float, float, float] = (10.0, 10.0, 10.0)
  shard_chunks_zyx: tuple[int, int, int] | None = None

  def write_unit_zyx(self) -> tuple[int, int, int]:
    """The smallest box (from the offset) that one writer must own: a chunk, or a shard."""
    if self.shard_chunks_zyx is None:
      return self.chunk_zyx
    return tuple(c * s for c, s in zip(self.chunk_zyx, self.shard_chunks_zyx))  # type: ignore[return-value]


def sharding_for(grid_chunks_zyx: Sequence[int], shard_chunks_zyx: Sequence[int]) -> dict:
  """A ``neuroglancer_uint64_sharded_v1`` spec whose shards are aligned boxes of
  ``shard_chunks_zyx`` storage chunks, for a volume of ``grid_chunks_zyx`` chunks.

  Chunks are keyed by their compressed Morton code (bits of x, y, z interleaved, x first, each
  axis giving bits only while it has any left); with identity hashing the shard is the code
  without its low ``preshift_bits + minishard_bits`` bits, so those low bits must be exactly the
  first ``log2(shard_chunks)`` bits of every axis. FFNError when the shard shape cannot be made
  so (not powers of two, or an axis that runs out of bits before another).
  """
  grid_xyz = [int(v) for v in reversed(list(grid_chunks_zyx))]
  want_xyz = [int(v) for v in reversed(list(shard_chunks_zyx))]
  for w in want_xyz:
    if w < 1 or w & (w - 1):
      raise FFNError(f"shard shape {want_xyz} (chunks, x,y,z) must be powers of two")
  bits = [max(0, int(g - 1).bit_length()) for g in grid_xyz]
  want_bits = [min(int(w).bit_length() - 1, b) for w, b in zip(want_xyz, bits)]
  # The order in which the compressed Morton code consumes the axes' bits.
  order: list[int] = []
  for level in range(max(bits, default=0)):
    order += [d for d in range(3) if level < bits[d]]
  low = sum(want_bits)
  taken = [order[:low].count(d) for d in range(3)]
  if taken != want_bits:
    raise FFNError(f"shard shape {want_xyz} (chunks, x,y,z) does not fit the chunk grid "
                   f"{grid_xyz} (x,y,z): use a cube no larger than the smallest axis")
  minishard = min(low, 3)
  return {"@type": "neuroglancer_uint64_sharded_v1", "hash": "identity",
          "preshift_bits": low - minishard, "minishard_bits": minishard,
          "shard_bits": sum(bits) - low, "minishard_index_encoding": "gzip",
          "data_encoding": "gzip"}


def _open_spec(spec) -> dict:
  """The TensorStore spec (JSON) of an input ``VolumeSpec`` with a ``scheme``."""
  if spec.scheme == "json":
    try:
      data = json.loads(spec.path)
    except ValueError as e:
      raise FFNError(f"volume spec {spec.path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or "driver" not in data:
      raise FFNError(f"volume spec {spec.path}: a TensorStore spec is a JSON object with a 'driver'")
    return data
  path = os.path.abspath(spec.path)
  if not os.path.exists(path):
    raise FFNError(f"{spec}: file or directory not found")
  if spec.scheme == "zarr":
    driver = "zarr3" if os.path.exists(os.path.join(path, "zarr.json")) else "zarr"
  else:
    driver = {"n5": "n5", "precomputed": "neuroglancer_precomputed"}[spec.scheme]
  return {"driver": driver, "kvstore": {"driver": "file", "path": path}}


def open_volume_array(spec):
  """A read-only, lazy TensorStore array of the input volume ``spec`` (a ``VolumeSpec`` with a
  ``scheme``), indexed from 0: z,y,x or channel,z,y,x as stored for Zarr/N5 and JSON specs of
  other drivers; a Neuroglancer precomputed volume's x,y,z,channel is transposed to
  channel,z,y,x and its single channel dropped; a ``voxel_offset`` is removed (index 0 is the
  first stored voxel). FFNError when it cannot be opened.
  """
  import tensorstore as ts
  data = _open_spec(spec)
  try:
    store = ts.open(data, read=True, open=True, context=_context()).result()
  except (ValueError, RuntimeError) as e:
    raise FFNError(f"{spec}: cannot open as a TensorStore volume ({e})") from None
  if data.get("driver") == "neuroglancer_precomputed":
    store = store.T
    if store.shape[0] == 1:
      store = store[0]
  return store.translate_to[0]


def _context():
  import tensorstore as ts
  return ts.Context({"cache_pool": {"total_bytes_limit": 0}})


def _ts_spec(spec: LabelsSpec, layout: LabelsLayout | None) -> dict:
  """TensorStore spec to open (layout None) or create (layout given) ``spec``."""
  kvstore = {"driver": "file", "path": os.path.abspath(spec.path)}
  if spec.format == "zarr":
    out: dict = {"driver": "zarr", "kvstore": kvstore}
    if layout is not None:
      out.update(create=True, metadata={
          "dtype": "<u8", "shape": list(layout.shape_zyx), "chunks": list(layout.chunk_zyx),
          "compressor": {"id": "blosc", "cname": "zstd", "clevel": 5, "shuffle": 2},
          "fill_value": 0, "order": "C"})
    return out
  out = {"driver": "neuroglancer_precomputed", "kvstore": kvstore}
  if layout is not None:
    scale = {"key": "_".join(f"{r:g}" for r in layout.resolution_nm_xyz),
             "size": list(layout.shape_zyx[::-1]), "voxel_offset": list(layout.offset_zyx[::-1]),
             "resolution": [float(r) for r in layout.resolution_nm_xyz],
             "chunk_size": list(layout.chunk_zyx[::-1]), "encoding": "compressed_segmentation",
             "compressed_segmentation_block_size": [8, 8, 8]}
    if layout.shard_chunks_zyx is not None:
      grid = [-(-n // c) for n, c in zip(layout.shape_zyx, layout.chunk_zyx)]
      scale["sharding"] = sharding_for(grid, layout.shard_chunks_zyx)
    out.update(create=True, scale_metadata=scale, multiscale_metadata={
        "type": "segmentation", "data_type": "uint64", "num_channels": 1})
  return out


def labels_exist(spec: LabelsSpec) -> bool:
  """Whether the output is already there (HDF5: the dataset in the file; others: the path)."""
  if spec.format != "h5":
    return os.path.exists(spec.path)
  return h5_has_dataset(spec.path, spec.dataset)


def create_labels(spec: LabelsSpec, layout: LabelsLayout) -> None:
  """Creates an empty (all 0) Zarr or precomputed volume with ``layout`` at ``spec.path``.

  HDF5 volumes are written whole by :func:`copy_to_h5` instead (one writer per file).
  """
  import tensorstore as ts
  if spec.format == "h5":
    raise ValueError("create_labels: HDF5 output is written with copy_to_h5")
  check_writable_dir(os.path.join(spec.path, "x"))
  try:
    ts.open(_ts_spec(spec, layout), context=_context()).result()
  except ValueError as e:
    raise FFNError(f"{spec}: cannot create the volume ({e})") from None
  if spec.format == "zarr":
    attrs = {"axes_order": "zyx", "voxel_offset_xyz": list(layout.offset_zyx[::-1]),
             "resolution_nm_xyz": list(layout.resolution_nm_xyz)}
    with open(os.path.join(spec.path, ".zattrs"), "w") as f:
      json.dump(attrs, f, indent=1)


class LabelsWriter:
  """Writes boxes (absolute z,y,x corners, uint64) into an existing Zarr/precomputed volume.

  A box is written a storage chunk's depth of z-planes at a time (one copy of that slab, not of
  the box), except in a sharded volume, where the whole box goes in one transaction (one write of
  each shard it covers)."""

  def __init__(self, spec: LabelsSpec):
    import tensorstore as ts
    self.spec = spec
    try:
      self._store = ts.open(_ts_spec(spec, None), context=_context(), open=True).result()
    except ValueError as e:
      raise FFNError(f"{spec}: cannot open the volume ({e})") from None
    self.offset_zyx = _offset_of(spec, self._store)
    chunk = list(self._store.chunk_layout.write_chunk.shape)
    self._planes = int(chunk[0] if spec.format == "zarr" else chunk[2])
    metadata = self._store.spec().to_json().get("scale_metadata", {})
    self._sharded = spec.format == "precomputed" and bool(metadata.get("sharding"))

  def _view(self, store, corner_zyx: Sequence[int], shape_zyx: Sequence[int]):
    c = [int(v) for v in corner_zyx]
    n = [int(v) for v in shape_zyx]
    if self.spec.format == "zarr":
      lo = [v - o for v, o in zip(c, self.offset_zyx)]
      return store[lo[0]:lo[0] + n[0], lo[1]:lo[1] + n[1], lo[2]:lo[2] + n[2]]
    return store[c[2]:c[2] + n[2], c[1]:c[1] + n[1], c[0]:c[0] + n[0], 0]

  def _as_stored(self, data: np.ndarray) -> np.ndarray:
    return data if self.spec.format == "zarr" else data.transpose(2, 1, 0)

  def write(self, corner_zyx: Sequence[int], data: np.ndarray) -> None:
    import tensorstore as ts
    data = np.asarray(data, np.uint64)
    if self._sharded:
      with ts.Transaction() as txn:
        self._view(self._store.with_transaction(txn), corner_zyx, data.shape)[...] = \
            self._as_stored(data)
      return
    for z in range(0, data.shape[0], self._planes):
      slab = data[z:z + self._planes]
      corner = (int(corner_zyx[0]) + z, int(corner_zyx[1]), int(corner_zyx[2]))
      self._view(self._store, corner, slab.shape).write(self._as_stored(slab)).result()


def _offset_of(spec: LabelsSpec, store) -> tuple[int, int, int]:
  if spec.format == "precomputed":
    return tuple(int(v) for v in store.domain.origin[:3][::-1])  # type: ignore[return-value]
  path = os.path.join(spec.path, ".zattrs")
  try:
    with open(path) as f:
      offset = json.load(f).get("voxel_offset_xyz", [0, 0, 0])
  except FileNotFoundError:
    offset = [0, 0, 0]
  except (OSError, ValueError) as e:
    raise FFNError(f"{path}: unreadable Zarr attributes ({e})") from None
  return tuple(int(v) for v in offset[::-1])  # type: ignore[return-value]


def read_labels(spec: LabelsSpec | str, corner_zyx: Sequence[int] | None = None,
                shape_zyx: Sequence[int] | None = None) -> tuple[np.ndarray, tuple[int, int, int]]:
  """(labels z,y,x, absolute corner z,y,x) of a box of a label volume, or of all of it.

  ``corner_zyx``/``shape_zyx``: the box in absolute voxels (both or neither).
  """
  import tensorstore as ts
  spec = parse_labels_spec(spec) if isinstance(spec, str) else spec
  if spec.format == "h5":
    f, ds = open_h5_dataset(f"{spec.path}:{spec.dataset}")
    with f:
      offset = tuple(int(v) for v in ds.attrs.get("voxel_offset_xyz", (0, 0, 0))[::-1])
      shape = ds.shape
      lo = [0, 0, 0] if corner_zyx is None else [int(c) - o for c, o in zip(corner_zyx, offset)]
      size = shape if shape_zyx is None else shape_zyx
      data = ds[tuple(slice(l, l + int(n)) for l, n in zip(lo, size))]
    return data, tuple(l + o for l, o in zip(lo, offset))  # type: ignore[return-value]
  try:
    store = ts.open(_ts_spec(spec, None), context=_context(), open=True).result()
  except ValueError as e:
    raise FFNError(f"{spec}: cannot open the volume ({e})") from None
  offset = _offset_of(spec, store)
  if spec.format == "zarr":
    shape = tuple(int(v) for v in store.shape)
  else:
    shape = tuple(int(v) for v in store.shape[:3][::-1])
  corner = offset if corner_zyx is None else tuple(int(c) for c in corner_zyx)
  size = shape if shape_zyx is None else tuple(int(n) for n in shape_zyx)
  if spec.format == "zarr":
    lo = [c - o for c, o in zip(corner, offset)]
    data = store[lo[0]:lo[0] + size[0], lo[1]:lo[1] + size[1], lo[2]:lo[2] + size[2]].read().result()
  else:
    c = corner
    data = store[c[2]:c[2] + size[2], c[1]:c[1] + size[1], c[0]:c[0] + size[0], 0].read().result()
    data = data.transpose(2, 1, 0)
  return np.ascontiguousarray(data), corner  # type: ignore[return-value]


def copy_to_h5(source: LabelsSpec, target: LabelsSpec, layout: LabelsLayout,
               block_zyx: Sequence[int], attrs: dict | None = None) -> None:
  """Streams a Zarr volume into ``target`` (``path.h5:dataset``), one block at a time, atomically.

  The dataset is uint64, chunked as ``layout.chunk_zyx`` (clipped to the shape), gzip level 4,
  with ``voxel_offset_xyz`` and ``attrs`` as attributes. If the file exists, its other datasets are
  kept (it is copied to a temporary name, the dataset added there, and the copy renamed over it).
  Memory: one block.
  """
  import shutil
  chunks = tuple(min(c, n) for c, n in zip(layout.chunk_zyx, layout.shape_zyx))
  with atomic_path(target.path, suffix=".h5") as tmp:
    if os.path.exists(target.path):
      shutil.copyfile(target.path, tmp)
    with h5py.File(tmp, "a") as f:
      if target.dataset in f:
        raise FFNError(f"{target}: the dataset already exists")
      ds = f.create_dataset(target.dataset, shape=layout.shape_zyx, dtype=np.uint64, chunks=chunks,
                            compression="gzip", compression_opts=4)
      ds.attrs["voxel_offset_xyz"] = np.array(layout.offset_zyx[::-1], np.int64)
      for key, value in (attrs or {}).items():
        ds.attrs[key] = value
      for z in range(0, layout.shape_zyx[0], block_zyx[0]):
        for y in range(0, layout.shape_zyx[1], block_zyx[1]):
          for x in range(0, layout.shape_zyx[2], block_zyx[2]):
            size = [min(b, n - o) for b, n, o in zip(block_zyx, layout.shape_zyx, (z, y, x))]
            corner = [o + v for o, v in zip(layout.offset_zyx, (z, y, x))]
            data, _ = read_labels(source, corner, size)
            ds[z:z + size[0], y:y + size[1], x:x + size[2]] = data
