"""Domain transfer with a trained generator F (unlabeled -> labeled appearance), any volume size.

The output has the input's shape and is uint8 (:mod:`secgan.normalization`: the same mapping as
in training). F loses ``m = 2 * generator_depth`` voxels per side (VALID convolutions), so every
output box is computed from the input box grown by ``m`` on each side.

Borders: where that grown box leaves the volume, the input is **reflection-padded**: voxel ``-k``
reads voxel ``k`` and voxel ``n - 1 + k`` reads ``n - 1 - k`` (the edge voxel is not repeated,
numpy's ``"reflect"``; for a box reaching further than the volume is long, reflection repeats
with period ``2 (n - 1)``). A volume therefore needs at least 2 voxels along each axis.

Tiling: :class:`TiledTransfer` computes a box in tiles of ``tile_size`` (x,y,z) output voxels,
each from its own input tile + margin; tiles of a box that is not a multiple of the tile size are
moved inward so that every tile has the same shape (one compiled function per run, overlaps
computed twice, written once). Because every output voxel depends only on its own input
neighbourhood, a tiled result equals an untiled one (up to float rounding of the convolutions).

Large volumes (:func:`run_transfer`): the volume is cut into blocks of ``block_size`` (x,y,z;
the last ones along an axis are smaller), one :class:`ffn.blockwise` job array computes them
(each task loads F once; each block is saved as ``<run_dir>/blocks/<x>_<y>_<z>.npy``, written
atomically), and once all are done they are copied into the output (HDF5 ``path.h5:dataset`` or
Zarr ``zarr://path``, written to a temporary name and renamed). A rerun skips finished blocks, so
an interrupted or preempted transfer resumes; ``--retry_failed`` resubmits failed ones.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ffn.axes import BoundingBox, xyz_to_zyx, zyx_to_xyz
from ffn.blockwise import TaskInterrupted, TaskReport, WorkItem, Worker, plan
from ffn.errors import FFNError
from ffn.io.atomic import atomic_path
from ffn.io.volumes import H5_SUFFIXES, Volume, parse_spec
from secgan.normalization import from_unit, to_unit

_log = logging.getLogger("secgan.transfer")

BLOCKS_SUBDIR = "blocks"


def load_generator(checkpoint: str, which: str = "F"):
  """Generator ``which`` ("F" or "G") of a SECGAN checkpoint (a prefix, or a training directory:
  its latest checkpoint), built from the ``secgan_flags.json`` beside it."""
  import tensorflow as tf
  from secgan.networks import Generator
  from secgan.train import read_config
  folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint)
  cfg = read_config(folder)
  prefix = tf.train.latest_checkpoint(checkpoint) if os.path.isdir(checkpoint) else checkpoint
  if prefix is None or not os.path.exists(prefix + ".index"):
    raise FFNError(f"{checkpoint}: no SECGAN checkpoint found")
  gen = Generator(which, cfg.generator_depth, cfg.generator_channels)
  status = tf.train.Checkpoint(**{which: gen}).restore(prefix)
  try:
    status.assert_existing_objects_matched()
  except AssertionError as e:
    raise FFNError(f"{prefix}: generator {which} does not match the checkpoint "
                   f"({str(e).splitlines()[0]})") from None
  status.expect_partial()
  return gen


def reflect_index(index: np.ndarray, n: int) -> np.ndarray:
  """Indices into [0, n) of possibly outside ``index`` by reflection (edge not repeated)."""
  if n == 1:
    return np.zeros_like(index)
  period = 2 * (n - 1)
  i = np.abs(index) % period
  return np.where(i >= n, period - i, i)


def read_reflected(volume: Volume, start_zyx: Sequence[int], size_zyx: Sequence[int]) -> np.ndarray:
  """The box ``start_zyx`` + ``size_zyx`` of ``volume`` (z,y,x), reflection-padded outside."""
  idx = [reflect_index(np.arange(s, s + n), dim)
         for s, n, dim in zip(start_zyx, size_zyx, volume.shape)]
  lo = [int(i.min()) for i in idx]
  hi = [int(i.max()) + 1 for i in idx]
  data = volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
  return data[np.ix_(*[i - o for i, o in zip(idx, lo)])]


def tile_starts(start: int, length: int, tile: int) -> list[int]:
  """Starts of tiles of ``tile`` covering [start, start + length); the last moved inward."""
  if length <= tile:
    return [start]
  starts = list(range(start, start + length - tile + 1, tile))
  if starts[-1] + tile < start + length:
    starts.append(start + length - tile)
  return starts


class TiledTransfer:
  """Runs a generator over boxes of a volume in tiles (module docstring).

  ``tile_zyx``: output voxels per tile (z,y,x); ``compute_dtype``: "float32" or "bfloat16".
  """

  def __init__(self, generator, tile_zyx: Sequence[int], compute_dtype: str = "float32"):
    import tensorflow as tf
    self.generator = generator
    self.margin = generator.margin
    self.tile_zyx = tuple(int(t) for t in tile_zyx)
    if min(self.tile_zyx) < 1:
      raise FFNError(f"--tile_size must be positive, got {list(zyx_to_xyz(self.tile_zyx))}")
    dtype = tf.as_dtype(compute_dtype)
    self._fn = tf.function(lambda x: generator(x, dtype), autograph=False)
    self._concrete: dict[tuple[int, ...], Callable] = {}

  def _run(self, unit: np.ndarray) -> np.ndarray:
    import tensorflow as tf
    shape = (1,) + unit.shape + (1,)
    fn = self._concrete.get(shape)
    if fn is None:
      fn = self._concrete[shape] = self._fn.get_concrete_function(tf.TensorSpec(shape, tf.float32))
    return fn(tf.constant(unit[None, ..., None])).numpy()[0, ..., 0]

  def box(self, read: Callable[[Sequence[int], Sequence[int]], np.ndarray],
          start_zyx: Sequence[int], size_zyx: Sequence[int]) -> np.ndarray:
    """Float32 unit-space output [z, y, x] of the box; ``read(start_zyx, size_zyx)`` returns
    uint8 input (any box, e.g. :func:`read_reflected`)."""
    m = self.margin
    out = np.empty(tuple(int(s) for s in size_zyx), np.float32)
    tile = [min(t, int(n)) for t, n in zip(self.tile_zyx, size_zyx)]
    per_axis = [tile_starts(int(s), int(n), t) for s, n, t in zip(start_zyx, size_zyx, tile)]
    for corner in itertools.product(*per_axis):
      raw = read([c - m for c in corner], [t + 2 * m for t in tile])
      result = self._run(to_unit(raw))
      sl = tuple(slice(c - s, c - s + t) for c, s, t in zip(corner, start_zyx, tile))
      out[sl] = result
    return out


def check_volume_shape(volume: Volume) -> None:
  """Raises FFNError for a volume too thin to reflect (fewer than 2 voxels along an axis)."""
  if min(volume.shape) < 2:
    raise FFNError(f"{volume.spec}: volume of size {list(zyx_to_xyz(volume.shape))} (x,y,z): "
                   "reflection padding needs at least 2 voxels along every axis")


def block_boxes(shape_zyx: Sequence[int], block_zyx: Sequence[int]) -> list[BoundingBox]:
  """Non-overlapping blocks (x,y,z boxes) of ``block_zyx`` covering the volume, the last ones
  along each axis smaller; x fastest."""
  ranges = [[(s, min(b, n - s)) for s in range(0, n, b)] for n, b in zip(shape_zyx, block_zyx)]
  return [BoundingBox((x[0], y[0], z[0]), (x[1], y[1], z[1]))
          for z in ranges[0] for y in ranges[1] for x in ranges[2]]


def plan_blocks(shape_zyx: Sequence[int], block_zyx: Sequence[int], margin: int) -> list[WorkItem]:
  """Blocks as work items: read box = block + ``margin`` (clipped; the rest is reflected)."""
  bounds = BoundingBox((0, 0, 0), zyx_to_xyz(shape_zyx))
  return plan(block_boxes(shape_zyx, block_zyx), (margin,) * 3, bounds)


class TransferWorker(Worker):
  """What each array task runs: F over its blocks, one ``.npy`` per block (pickled: texts only)."""

  def __init__(self, checkpoint: str, input_spec: str, run_dir: str, tile_zyx: Sequence[int],
               compute_dtype: str):
    self.checkpoint, self.input_spec, self.run_dir = checkpoint, input_spec, run_dir
    self.tile_zyx, self.compute_dtype = tuple(tile_zyx), compute_dtype

  def block_path(self, item: WorkItem) -> Path:
    return Path(self.run_dir) / BLOCKS_SUBDIR / f"{item.id}.npy"

  def is_done(self, item: WorkItem) -> bool:
    return self.block_path(item).exists()

  def run(self, items: Sequence[WorkItem], report: TaskReport) -> None:
    todo = [item for item in items if not self.is_done(item)]
    if not todo:
      return
    transfer = TiledTransfer(load_generator(self.checkpoint), self.tile_zyx, self.compute_dtype)
    with Volume(self.input_spec) as volume:
      for item in todo:
        if self._stopping:
          raise TaskInterrupted("stopped before the next block")
        report.started(item)
        unit = transfer.box(lambda s, n: read_reflected(volume, s, n),
                            xyz_to_zyx(item.write_box.start), item.write_box.shape_zyx())
        path = self.block_path(item)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, suffix=".npy") as tmp:
          with open(tmp, "wb") as f:
            np.save(f, from_unit(unit))
        report.finished(item)


def check_output_spec(text: str) -> tuple[str, str, str | None]:
  """(format "h5" or "zarr", path, dataset) of ``--output`` (FFNError when neither)."""
  if text.startswith("zarr://"):
    path = text[len("zarr://"):]
    if not path:
      raise FFNError(f"--output {text}: empty Zarr path")
    return "zarr", path, None
  spec = parse_spec(text)
  if spec.dataset is None or spec.name is not None or not spec.path.lower().endswith(H5_SUFFIXES):
    raise FFNError(f"--output {text}: expected path.h5:dataset or zarr://path")
  return "h5", spec.path, spec.dataset


def assemble(items: Sequence[WorkItem], worker: TransferWorker, shape_zyx: Sequence[int],
             output: str, attrs: dict) -> None:
  """Copies every block into ``output`` (written under a temporary name, then renamed)."""
  fmt, path, dataset = check_output_spec(output)
  shape = tuple(int(s) for s in shape_zyx)
  chunks = tuple(min(64, s) for s in shape)
  if fmt == "h5":
    import h5py
    with atomic_path(path, suffix=".h5") as tmp:
      exists = os.path.exists(path)
      if exists:  # keep the file's other datasets (the copy is renamed over it)
        shutil.copyfile(path, tmp)
      with h5py.File(tmp, "a" if exists else "w") as f:
        if dataset in f:
          del f[dataset]
        ds = f.create_dataset(dataset, shape=shape, dtype=np.uint8, chunks=chunks,
                              compression="gzip")
        for item in items:
          ds[item.write_box.to_slices()] = np.load(worker.block_path(item))
        for k, v in attrs.items():
          ds.attrs[k] = v
    return
  import json
  import tensorstore as ts
  if os.path.exists(path):
    raise FFNError(f"--output zarr://{path}: already exists (remove it to write it again)")
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
  try:
    store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": tmp}, "create": True,
                     "delete_existing": True,
                     "metadata": {"dtype": "|u1", "shape": list(shape), "chunks": list(chunks),
                                  "compressor": {"id": "blosc", "cname": "zstd", "clevel": 5,
                                                 "shuffle": 1}, "fill_value": 0, "order": "C"}}
                    ).result()
    for item in items:
      store[item.write_box.to_slices()].write(np.load(worker.block_path(item))).result()
    with open(os.path.join(tmp, ".zattrs"), "w") as f:
      json.dump(dict(attrs, axes_order="zyx"), f, indent=1)
    os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
