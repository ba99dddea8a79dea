"""The phases of ``ffn stitch``: plan, extract, match, resolve, write, finalise.

Work directory (``--work_dir``, default ``<output path>.stitch``)::

  plan.json                          everything that determines the result (checked on a re-run)
  extract/ match/ write/             blockwise run directories (manifest, submissions, task
                                     status files, logs) of the three array phases
  chunks/<x>_<y>_<z>.npz             per chunk: its sorted ids, the labels of the box it owns and
                                     of every overlap it shares with another chunk
  pairs/<x>_<y>_<z>.npz              per chunk: the accepted merges with every later chunk it
                                     overlaps, the voxels of its owned box filled from other
                                     chunks (:mod:`ffn.stitch.fill`), and counters
  global/<x>_<y>_<z>.npy             per chunk: the global id of each of its sorted ids
  blocks/<x>_<y>_<z>.json            per output block, once written: counters
  idmap.npz                          (chunk, local id) -> global id of every object
  summary.json                       counts, parameters, timings, peak memory per phase

Phases (each skips what is already done, so a re-run of the same command resumes):

1. **plan** (this process): list the chunk files, read their shapes from the npz headers, infer and
   check the tiling (:mod:`ffn.stitch.tiling`), check it against a batch run's manifest or
   ``--subvolume_size``/``--overlap``; nothing is written before every check passed.
2. **extract** (array over chunks): a task loads a chunk once (through
   :mod:`ffn.inference.storage`, optionally the split consensus of two runs) and keeps only its ids,
   its owned box and its overlaps.
3. **match** (array over chunks; each item is the overlaps of one chunk with the chunks it shares
   voxels with): a task reads the two copies of each overlap with a later chunk and applies the
   merge rule (:mod:`ffn.stitch.match`), and takes the voxels of its owned box that it left
   unsegmented from the chunk that segmented them from deepest inside (:mod:`ffn.stitch.fill`).
4. **resolve** (this process, ids only): union-find and global ids (:mod:`ffn.stitch.ids`).
5. **write** (array over output blocks aligned to the output's storage chunks or shards): a task
   assembles one block from the owned boxes of the chunks that own it and their filled voxels,
   relabelled, and writes it.
6. **finalise** (this process): ``summary.json``, then the staged volume is renamed into place
   (Zarr, precomputed; staged as ``.<name>.partial`` beside the output) or streamed block by block
   into the HDF5 file (staged as ``staging.zarr`` in the work directory). The output therefore
   appears only when complete; a re-run once it exists is refused as an existing output.

A task that died or was stopped (SIGTERM) leaves its items to the re-run with ``--retry_failed``
(:mod:`ffn.blockwise`); the result never depends on how items were split into tasks or in which
order they ran.

Memory per task: one chunk (extract), two overlaps (match), one block plus one owned box (write).
Every task records its peak resident memory (``VmHWM``) and its resident memory when it started,
so the summary shows the growth per phase.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import ffn
from ffn import labels as labellib
from ffn.axes import BoundingBox, split_box, zyx_to_xyz
from ffn.blockwise import WorkItem, Worker, check_manifest, run_array, status_lines
from ffn.errors import FFNError
from ffn.inference import storage
from ffn.io.atomic import atomic_path, write_text_atomic
from ffn.io.tensorstore_volumes import (LabelsLayout, LabelsSpec, LabelsWriter, copy_to_h5,
                                        create_labels, labels_exist, sharding_for)
from ffn.stitch import ids as idlib
from ffn.stitch.fill import Filled, UnsegmentedFill
from ffn.stitch.match import match_overlap
from ffn.stitch.tiling import Box, Tiling, check_expected, infer_tiling, intersect, local_slices
from ffn.stitch.tiling import owners_of, write_blocks

_log = logging.getLogger(__name__)

PLAN = "plan.json"
WORK_FORMAT = 2  # layout of the work directory's files (2: pairs files hold the fill)


def _name(corner_zyx: Sequence[int]) -> str:
  """``<x>_<y>_<z>`` of a z,y,x corner (the corner of result file names)."""
  return "_".join(str(int(v)) for v in zyx_to_xyz(corner_zyx))


def _bbox(box: Box) -> BoundingBox:
  return BoundingBox(zyx_to_xyz(box[0]), zyx_to_xyz(box[1]))


def _voxels(box: Box) -> int:
  return int(np.prod(box[1]))


def memory_kib() -> dict[str, int]:
  """This process's resident memory now and at its peak (``VmRSS``, ``VmHWM``), KiB."""
  out = {}
  with open("/proc/self/status") as f:
    for line in f:
      key, _, value = line.partition(":")
      if key in ("VmRSS", "VmHWM"):
        out[key] = int(value.split()[0])
  return out


def npz_shape(path: str, key: str = "segmentation") -> tuple[int, ...]:
  """Shape of array ``key`` of an npz file, read from its header (nothing is decompressed
  beyond it)."""
  try:
    with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as f:
      version = np.lib.format.read_magic(f)
      reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
      shape, _, _ = reader(f)
  except KeyError:
    raise FFNError(f"{path}: no {key!r} array in this npz file") from None
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise FFNError(f"{path}: not a readable FFN npz file ({e})") from None
  return tuple(int(v) for v in shape)


# ------------------------------------------------------------------------------- sources

@dataclasses.dataclass
class Source:
  """Where the chunk labels come from: ``directory`` (google's layout), read with
  :func:`ffn.inference.storage.load_segmentation` (``split_cc``, ``min_size``); or, with
  ``consensus_request`` (serialised ``ConsensusRequest``), the split consensus of its two
  segmentation sources per chunk (:func:`ffn.consensus.consensus.compute_consensus`); or, with
  ``consensus_dirs`` (the SLURM fork's ``run_consensus.py --segmentation_dirs``), ``directory``
  split by each of these runs in turn (:func:`ffn.consensus.split.split_by_intersection`, every
  run read with ``split_cc``/``min_size``; pieces under ``split_min_size`` voxels cleared)."""
  directory: str
  split_cc: bool = False
  min_size: int = 0
  consensus_request: bytes | None = None
  consensus_dirs: tuple[str, ...] = ()
  split_min_size: int = 0

  def describe(self) -> dict[str, Any]:
    out: dict[str, Any] = {"directory": self.directory, "split_cc": self.split_cc,
                           "min_size": self.min_size}
    if self.consensus_request is not None:
      from google.protobuf import text_format
      out["consensus_request"] = text_format.MessageToString(self._request())
    if self.consensus_dirs:
      out["consensus_dirs"] = list(self.consensus_dirs)
      out["split_min_size"] = self.split_min_size
    return out

  def _request(self):
    from ffn.consensus.consensus import ConsensusRequest
    request = ConsensusRequest()
    request.ParseFromString(self.consensus_request)
    return request

  def corners(self) -> list[tuple[int, int, int]]:
    corners = storage.existing_corners(self.directory)
    others = list(self.consensus_dirs)
    if self.consensus_request is not None:
      others.append(self._request().segmentation2.directory)
    for other in others:
      if not os.path.isdir(other):
        raise FFNError(f"{other}: segmentation directory not found")
      theirs = set(storage.existing_corners(other))
      for corner in corners:
        if corner not in theirs:
          raise FFNError(f"{other}: no result at corner {list(zyx_to_xyz(corner))} (x,y,z), which "
                         f"{self.directory} has (every run of the consensus needs every chunk)")
    return corners

  def path(self, corner: Sequence[int]) -> str:
    path = storage.existing_segmentation_path(self.directory, corner)
    assert path is not None
    return path

  def load(self, corner: Sequence[int]) -> np.ndarray:
    if self.consensus_request is not None:
      from ffn.consensus.consensus import compute_consensus
      labels, _ = compute_consensus(self._request(), corner)
      return labels
    labels, _ = storage.load_segmentation(self.directory, corner, split_cc=self.split_cc,
                                          min_size=self.min_size)
    if self.consensus_dirs:
      from ffn.consensus.split import split_by_intersection
      for other in self.consensus_dirs:
        theirs, _ = storage.load_segmentation(other, corner, split_cc=self.split_cc,
                                              min_size=self.min_size)
        if theirs.shape != labels.shape:
          raise FFNError(f"{other}: the chunk at {list(zyx_to_xyz(corner))} (x,y,z) has shape "
                         f"{list(theirs.shape[::-1])}, {self.directory}'s has "
                         f"{list(labels.shape[::-1])} (x,y,z)")
        labels = split_by_intersection(labels, theirs, self.split_min_size)
    return labels


# ---------------------------------------------------------------------------------- plan

@dataclasses.dataclass
class Params:
  """Settings of one stitch. Sizes are z,y,x voxels."""
  min_agreement: float = 0.5
  min_overlap: int = 100
  block_zyx: tuple[int, int, int] = (64, 64, 64)
  chunk_zyx: tuple[int, int, int] = (64, 64, 64)
  resolution_nm_xyz: tuple[float, float, float] = (10.0, 10.0, 10.0)
  sharded: bool = False

  def check(self, spec: LabelsSpec) -> None:
    if not 0.0 < self.min_agreement <= 1.0:
      raise FFNError(f"--min_agreement must be in (0, 1], got {self.min_agreement}")
    if self.min_overlap < 1:
      raise FFNError(f"--min_overlap must be at least 1 voxel, got {self.min_overlap}")
    for name, value in (("--block_size", self.block_zyx), ("--chunk_size", self.chunk_zyx)):
      if any(v < 1 for v in value):
        raise FFNError(f"{name} must be positive, got {list(value[::-1])} (x,y,z)")
    if any(b % c for b, c in zip(self.block_zyx, self.chunk_zyx)):
      raise FFNError(f"--block_size {list(self.block_zyx[::-1])} must be a multiple of --chunk_size "
                     f"{list(self.chunk_zyx[::-1])} (x,y,z): every storage chunk in one block")
    if self.sharded:
      if spec.format != "precomputed":
        raise FFNError(f"--sharded applies to precomputed:// outputs only, not {spec}")
      ratio = [b // c for b, c in zip(self.block_zyx, self.chunk_zyx)]
      if any(r & (r - 1) for r in ratio):
        raise FFNError(f"--sharded: --block_size / --chunk_size must be powers of two per axis, "
                       f"got {ratio[::-1]} (x,y,z)")
    if any(r <= 0 for r in self.resolution_nm_xyz):
      raise FFNError(f"--resolution must be positive, got {list(self.resolution_nm_xyz)}")


@dataclasses.dataclass
class Plan:
  """A checked stitch: where things are and what determines the result."""
  source: Source
  output: LabelsSpec
  work_dir: Path
  tiling: Tiling
  params: Params

  @property
  def names(self) -> list[str]:
    return [_name(c) for c in self.tiling.chunk_corners]

  def layout(self) -> LabelsLayout:
    shard = None
    if self.params.sharded:
      shard = tuple(b // c for b, c in zip(self.params.block_zyx, self.params.chunk_zyx))
    return LabelsLayout(self.tiling.region_shape, self.tiling.region_corner, self.params.chunk_zyx,
                        self.params.resolution_nm_xyz, shard)  # type: ignore[arg-type]

  def staging(self) -> LabelsSpec:
    """Where the write phase writes: beside the output (renamed at the end), or, for HDF5, a
    Zarr volume in the work directory (streamed into the file at the end)."""
    if self.output.format == "h5":
      return LabelsSpec("zarr", str(self.work_dir / "staging.zarr"))
    path = Path(os.path.abspath(self.output.path))
    return self.output.at(str(path.parent / f".{path.name}.partial"))

  def manifest(self) -> dict[str, Any]:
    p = self.params
    return {"stage": "stitch", "ffn_version": ffn.__version__, "source": self.source.describe(),
            "chunks_xyz": [[list(zyx_to_xyz(c)), list(zyx_to_xyz(self.tiling.chunk_box(i)[1]))]
                           for i, c in enumerate(self.tiling.chunk_corners)],
            "output": str(self.output), "min_agreement": p.min_agreement,
            "min_overlap": p.min_overlap, "block_size": list(p.block_zyx[::-1]),
            "chunk_size": list(p.chunk_zyx[::-1]), "resolution": list(p.resolution_nm_xyz),
            "sharded": p.sharded, "work_format": WORK_FORMAT}


def _batch_manifest(path: Path) -> tuple[dict, list[WorkItem]] | None:
  """(manifest, items) of a batch inference run at ``path`` (its manifest.json, or a results
  directory holding ``batch/manifest.json``), or None."""
  from ffn.blockwise import load_manifest
  candidates = [path] if path.name == "manifest.json" else [path / "batch" / "manifest.json"]
  for candidate in candidates:
    if candidate.is_file():
      manifest, items = load_manifest(candidate)
      if manifest.get("stage") != "batch_inference":
        raise FFNError(f"{candidate}: not a batch_inference run (stage {manifest.get('stage')!r})")
      return manifest, items
  return None


def make_plan(segmentation_dir: str | None, output: LabelsSpec, work_dir: str | None,
              params: Params, split_cc: bool = False, min_size: int = 0,
              consensus_request: bytes | None = None,
              subvolume_size_xyz: Sequence[int] | None = None,
              overlap_xyz: Sequence[int] | None = None,
              bounding_box: BoundingBox | None = None,
              consensus_dirs: Sequence[str] = (), split_min_size: int = 0) -> Plan:
  """Checks everything a stitch needs; writes nothing (every problem is one FFNError).

  ``segmentation_dir``: the chunk results (google's layout), a batch run's results directory
  (its ``batch/manifest.json`` then says which chunks there must be) or that manifest itself (the
  results of its last request are stitched). ``consensus_request``: instead of a directory, the
  split consensus of a ConsensusRequest's two sources per chunk. ``consensus_dirs`` (with
  ``split_min_size``): other runs of the same chunks, each split into the first
  (:class:`Source`). ``subvolume_size_xyz``,
  ``overlap_xyz`` and ``bounding_box`` (default: the region the chunks cover): the chunks must be
  exactly ``split_box(bounding_box, subvolume_size_xyz, overlap_xyz)`` (without them, or a batch
  manifest, a chunk missing at the region's edge cannot be told from a smaller region).
  """
  params.check(output)
  if labels_exist(output):
    raise FFNError(f"{output}: the output already exists; remove it or choose another --output")
  expected: list[Box] | None = None
  where = ""
  if consensus_request is not None:
    from ffn.consensus.consensus import ConsensusRequest
    request = ConsensusRequest()
    request.ParseFromString(consensus_request)
    directory = request.segmentation1.directory
  else:
    if segmentation_dir is None:
      raise FFNError("give --segmentation_dir or --consensus_request")
    directory = segmentation_dir
    batch = _batch_manifest(Path(segmentation_dir))
    if batch is not None:
      manifest, items = batch
      if Path(segmentation_dir).name == "manifest.json":
        directory = manifest["output_dirs"][-1]
      expected = [(tuple(int(v) for v in it.write_box.start[::-1]),
                   tuple(int(v) for v in it.write_box.size[::-1])) for it in items]
      where = f"the batch run manifest of {segmentation_dir}"
  if not os.path.isdir(directory):
    raise FFNError(f"{directory}: segmentation directory not found")
  source = Source(os.path.abspath(directory), split_cc, min_size, consensus_request,
                  tuple(os.path.abspath(d) for d in consensus_dirs), split_min_size)
  corners = source.corners()
  if not corners:
    raise FFNError(f"{directory}: no seg-<x>_<y>_<z>.npz chunk results here")
  files = [source.path(c) for c in corners]
  boxes = [(c, npz_shape(f)) for c, f in zip(corners, files)]
  for (c, shape), f in zip(boxes, files):
    if len(shape) != 3:
      raise FFNError(f"{f}: segmentation is not 3D (shape {list(shape)})")
  tiling = infer_tiling(boxes, files)  # type: ignore[arg-type]
  if expected is None and subvolume_size_xyz is not None:
    region = bounding_box or BoundingBox(zyx_to_xyz(tiling.region_corner),
                                         zyx_to_xyz(tiling.region_shape))
    boxes_xyz = split_box(region, subvolume_size_xyz, overlap_xyz or (0, 0, 0))
    expected = [(tuple(int(v) for v in b.start[::-1]), tuple(int(v) for v in b.size[::-1]))
                for b in boxes_xyz]
    where = (f"--subvolume_size {','.join(map(str, subvolume_size_xyz))} --overlap "
             f"{','.join(map(str, overlap_xyz or (0, 0, 0)))}"
             + (f" of --bounding_box {bounding_box}" if bounding_box is not None else ""))
  elif expected is None and bounding_box is not None:
    raise FFNError("--bounding_box needs --subvolume_size (and --overlap): the tiling to check")
  if expected is not None:
    check_expected(tiling, expected, where)  # type: ignore[arg-type]
  work = Path(work_dir) if work_dir else Path(os.path.abspath(output.path) + ".stitch")
  plan = Plan(source, output, work.absolute(), tiling, params)
  layout = plan.layout()
  if layout.shard_chunks_zyx is not None:
    sharding_for([-(-n // c) for n, c in zip(layout.shape_zyx, layout.chunk_zyx)],
                 layout.shard_chunks_zyx)
  plan_path = plan.work_dir / PLAN
  if plan_path.exists():
    try:
      old = json.loads(plan_path.read_text())
    except (OSError, ValueError) as e:
      raise FFNError(f"{plan_path}: unreadable stitch plan ({e})") from None
    new = json.loads(json.dumps(plan.manifest()))
    for key in new:
      if old.get(key) != new[key]:
        raise FFNError(f"{plan_path}: this stitch's {key!r} differs from the one begun in this work "
                       "directory; use another --work_dir, or the same settings to resume")
  return plan


# ------------------------------------------------------------------------------ workers

class _PhaseWorker(Worker):
  """Shared state of the array phases' workers: the plan's essentials (picklable)."""

  def __init__(self, work_dir: Path, tiling: Tiling):
    self.work_dir = str(work_dir)
    self.tiling_json = tiling.to_json()

  @property
  def tiling(self) -> Tiling:
    if getattr(self, "_tiling", None) is None:
      self._tiling = Tiling.from_json(self.tiling_json)
    return self._tiling

  def chunk_file(self, index: int) -> Path:
    return Path(self.work_dir) / "chunks" / f"{_name(self.tiling.chunk_box(index)[0])}.npz"

  def start_memory(self) -> None:
    """Before the first item of this task: loads the libraries the phases use, resets the
    process's peak (``VmHWM``, Linux ``clear_refs``) so that it excludes start-up, and records
    the idle baseline (``VmRSS``)."""
    if getattr(self, "_baseline_kib", None) is None:
      import fastremap  # noqa: F401 - what the phases import, loaded before the baseline
      import tensorstore  # noqa: F401
      try:
        with open("/proc/self/clear_refs", "w") as f:
          f.write("5")
      except OSError:
        pass  # the peak then includes start-up: an upper bound
      self._baseline_kib = memory_kib()["VmRSS"]

  def _memory_fields(self) -> dict[str, int]:
    """The task's baseline and its peak so far (KiB), saved with each item's output."""
    return {"baseline_rss_kib": self._baseline_kib, "peak_rss_kib": memory_kib()["VmHWM"]}


def _save_npz(path: Path, **arrays) -> None:
  storage.save_npz_atomic(str(path), **arrays)


def _save_npz_members(path: Path, members) -> None:
  """An npz file (deflate-compressed, as ``np.savez_compressed``) written atomically from an
  iterable of (name, array), one member at a time: only one member need exist at once."""
  with atomic_path(path, suffix=".npz") as tmp:
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
      for name, array in members:
        with z.open(f"{name}.npy", "w", force_zip64=True) as f:
          np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())


class ExtractWorker(_PhaseWorker):
  """Phase 2: per chunk, ``chunks/<name>.npz`` with ``ids`` (sorted non-zero local ids, uint64),
  ``owned`` (labels of the owned box), ``owned_ids``/``owned_counts``, ``ov_<j>`` (labels of the
  overlap with chunk j) and ``memory`` (JSON)."""

  def __init__(self, work_dir: Path, tiling: Tiling, source: Source):
    super().__init__(work_dir, tiling)
    self.source = source

  def is_done(self, item: WorkItem) -> bool:
    return self.chunk_file(int(item.id.split(":")[0])).exists()

  def process(self, item: WorkItem) -> None:
    self.start_memory()
    index = int(item.id.split(":")[0])
    box = self.tiling.chunk_box(index)
    labels = self.source.load(box[0])
    if labels.shape != tuple(box[1]):
      raise FFNError(f"chunk at {_name(box[0])} (x,y,z): labels have shape {labels.shape[::-1]}, "
                     f"the plan says {box[1][::-1]} (x,y,z)")
    labels = storage.reduce_id_bits(labels)
    ids = labellib.unique(labels)
    ids = ids[ids != 0].astype(np.uint64)
    owned_box = self.tiling.owned_box(index)
    owned = np.ascontiguousarray(labels[local_slices(owned_box, box)])
    owned_ids, owned_counts = labellib.unique(owned, return_counts=True)
    keep = owned_ids != 0

    def members():
      yield "ids", ids
      yield "owned", owned
      yield "owned_ids", owned_ids[keep].astype(np.uint64)
      yield "owned_counts", owned_counts[keep].astype(np.int64)
      for i, j in self.tiling.pairs():
        if index in (i, j):
          other = j if i == index else i
          shared = intersect(box, self.tiling.chunk_box(other))
          assert shared is not None
          yield f"ov_{other}", np.ascontiguousarray(labels[local_slices(shared, box)])
      yield "memory", np.array(json.dumps(self._memory_fields()))

    _save_npz_members(self.chunk_file(index), members())


def neighbours(tiling: Tiling) -> list[list[int]]:
  """Per chunk, the other chunks whose boxes share voxels with it (ascending)."""
  out: list[list[int]] = [[] for _ in range(tiling.num_chunks)]
  for i, j in tiling.pairs():
    out[i].append(j)
    out[j].append(i)
  return [sorted(n) for n in out]


def forward_pairs(tiling: Tiling) -> dict[int, list[int]]:
  """Chunk i -> the chunks j > i whose boxes share voxels with it (chunks with none left out)."""
  out: dict[int, list[int]] = {}
  for i, j in tiling.pairs():
    out.setdefault(i, []).append(j)
  return out


class MatchWorker(_PhaseWorker):
  """Phase 3: per chunk i, ``pairs/<name i>.npz`` with

  * the accepted merges with every later chunk j it shares voxels with (``ids_i_<j>``,
    ``ids_j_<j>``, ``counts_<j>``, ``scores_<j>``; :mod:`ffn.stitch.match`),
  * the voxels of its owned box that it left unsegmented and another chunk labelled
    (``fill_index``, ``fill_source``, ``fill_label``; :mod:`ffn.stitch.fill`),
  * ``counters`` (JSON: j -> counters of that overlap; ``filled_voxels``) and ``memory`` (JSON).

  One item per chunk rather than per pair keeps the number of small files (and fsyncs) low."""

  def __init__(self, work_dir: Path, tiling: Tiling, min_agreement: float, min_overlap: int):
    super().__init__(work_dir, tiling)
    self.min_agreement = min_agreement
    self.min_overlap = min_overlap

  def pair_file(self, i: int) -> Path:
    return Path(self.work_dir) / "pairs" / f"{_name(self.tiling.chunk_box(i)[0])}.npz"

  def is_done(self, item: WorkItem) -> bool:
    return self.pair_file(int(item.id.split(":")[0])).exists()

  def process(self, item: WorkItem) -> None:
    self.start_memory()
    i = int(item.id.split(":")[0])
    tiling = self.tiling
    box = tiling.chunk_box(i)
    owned_box = tiling.owned_box(i)
    arrays: dict[str, np.ndarray] = {}
    counters: dict[str, Any] = {}
    with np.load(self.chunk_file(i)) as mine:
      fill = UnsegmentedFill(mine["owned"], owned_box)
      for j in neighbours(tiling)[i]:
        with np.load(self.chunk_file(j)) as theirs:
          b = theirs[f"ov_{i}"]
        shared = intersect(box, tiling.chunk_box(j))
        region = intersect(owned_box, tiling.chunk_box(j))
        assert shared is not None
        if region is not None:
          fill.offer(j, tiling.chunk_box(j), region, b[local_slices(region, shared)])
        if j > i:
          matches = match_overlap(mine[f"ov_{j}"], b, self.min_agreement, self.min_overlap)
          arrays.update({f"ids_i_{j}": matches.ids_a, f"ids_j_{j}": matches.ids_b,
                         f"counts_{j}": matches.counts, f"scores_{j}": matches.scores})
          counters[str(j)] = matches.counters
        del b
    filled = fill.result()
    del fill
    counters["filled_voxels"] = int(filled.index.size)
    _save_npz(self.pair_file(i), counters=np.array(json.dumps(counters)),
              memory=np.array(json.dumps(self._memory_fields())), fill_index=filled.index,
              fill_source=filled.source, fill_label=filled.label, **arrays)


class WriteWorker(_PhaseWorker):
  """Phase 5: per output block, the relabelled labels of its owners written to the staged
  volume, then ``blocks/<name>.json`` (counters)."""

  def __init__(self, work_dir: Path, tiling: Tiling, staging: LabelsSpec):
    super().__init__(work_dir, tiling)
    self.staging = staging

  def block_file(self, item: WorkItem) -> Path:
    return Path(self.work_dir) / "blocks" / f"{item.id}.json"

  def is_done(self, item: WorkItem) -> bool:
    return self.block_file(item).exists()

  def process(self, item: WorkItem) -> None:
    self.start_memory()
    if getattr(self, "_writer", None) is None:
      self._writer = LabelsWriter(self.staging)
    corner = tuple(int(v) for v in item.write_box.start[::-1])
    shape = tuple(int(v) for v in item.write_box.size[::-1])
    block: Box = (corner, shape)  # type: ignore[assignment]
    out = np.zeros(shape, np.uint64)
    for index, part in owners_of(self.tiling, block):
      owned_box = self.tiling.owned_box(index)
      with np.load(self.chunk_file(index)) as data:
        owned, local = data["owned"], data["ids"]
      target = out[local_slices(part, block)]
      _relabel_into(target, owned[local_slices(part, owned_box)], local, self._global_ids(index))
      del owned
      with np.load(Path(self.work_dir) / "pairs" / f"{_name(self.tiling.chunk_box(index)[0])}.npz"
                   ) as data:
        filled = Filled(data["fill_index"], data["fill_source"], data["fill_label"])
      self._apply_fill(target, part, owned_box, filled)
    self._writer.write(corner, out)
    write_text_atomic(self.block_file(item), json.dumps({"voxels": int(out.size),
                                                         **self._memory_fields()}) + "\n")


  def _global_ids(self, index: int) -> np.ndarray:
    return np.load(Path(self.work_dir) / "global" / f"{_name(self.tiling.chunk_box(index)[0])}.npy")

  def _apply_fill(self, target: np.ndarray, part: Box, owned_box: Box, filled: Filled) -> None:
    """Writes the filled voxels of ``owned_box`` that lie in ``part`` into ``target`` (the
    block's view of ``part``), each through its source chunk's global ids."""
    if not filled.index.size:
      return
    coords = np.unravel_index(filled.index, owned_box[1])
    rel = [c + o - p for c, o, p in zip(coords, owned_box[0], part[0])]
    inside = np.ones(filled.index.size, bool)
    for r, n in zip(rel, part[1]):
      inside &= (r >= 0) & (r < n)
    for j in np.unique(filled.source[inside]).tolist():
      sel = inside & (filled.source == j)
      with np.load(self.chunk_file(j)) as data:
        ids = data["ids"]
      gids = self._global_ids(j)[np.searchsorted(ids, filled.label[sel])]
      target[tuple(r[sel] for r in rel)] = gids


_DENSE_MAX_ID = 1 << 22  # local ids up to this are relabelled through a dense table


def _relabel_into(out: np.ndarray, labels: np.ndarray, local: np.ndarray, global_ids: np.ndarray,
                  planes: int = 8) -> None:
  """``out[...] = global id of labels`` (local sorted ids ``local`` -> ``global_ids``), ``planes``
  z-planes at a time so that no temporary is larger than those planes."""
  top = int(local[-1]) if local.size else 0
  table = None
  if top <= _DENSE_MAX_ID:
    table = np.zeros(top + 1, np.uint64)
    table[local.astype(np.int64)] = global_ids
  for z in range(0, labels.shape[0], planes):
    piece = labels[z:z + planes]
    out[z:z + planes] = table[piece] if table is not None else idlib.relabel(piece, local, global_ids)


# ----------------------------------------------------------------------------- resolve

def resolve(plan: Plan) -> dict[str, Any]:
  """Phase 4: union-find over all (chunk, local id) nodes, global ids, ``global/<name>.npy`` per
  chunk and ``idmap.npz``; returns the counters for the summary. Reads ids only."""
  work = plan.work_dir
  tiling = plan.tiling
  ids_per_chunk, owned_per_chunk = [], []
  for index in range(tiling.num_chunks):
    with np.load(work / "chunks" / f"{plan.names[index]}.npz") as data:
      ids_per_chunk.append(data["ids"])
      owned_per_chunk.append(data["owned_ids"])
  offsets = idlib.node_offsets(ids_per_chunk)
  edges_a, edges_b = [], []
  totals: dict[str, int] = {}
  num_nodes = int(offsets[-1])
  owns = np.zeros(num_nodes, bool)
  for index, owned in enumerate(owned_per_chunk):
    owns[idlib.node_index(ids_per_chunk[index], offsets[index], owned)] = True
  partners = forward_pairs(tiling)
  filled_voxels = 0
  for i in range(tiling.num_chunks):
    with np.load(work / "pairs" / f"{plan.names[i]}.npz") as data:
      counters = json.loads(str(data["counters"]))
      for j in partners.get(i, []):
        edges_a.append(idlib.node_index(ids_per_chunk[i], offsets[i], data[f"ids_i_{j}"]))
        edges_b.append(idlib.node_index(ids_per_chunk[j], offsets[j], data[f"ids_j_{j}"]))
        for key in ("pairs", "below_min_overlap", "below_min_agreement", "not_one_to_one",
                    "merged"):
          totals[key] = totals.get(key, 0) + counters[str(j)][key]
      filled = Filled(data["fill_index"], data["fill_source"], data["fill_label"])
    filled_voxels += counters["filled_voxels"]
    for j in np.unique(filled.source).tolist():  # ids that reach the output through the fill
      owns[idlib.node_index(ids_per_chunk[j], offsets[j], filled.ids_of(j))] = True
  a = np.concatenate(edges_a) if edges_a else np.zeros(0, np.int64)
  b = np.concatenate(edges_b) if edges_b else np.zeros(0, np.int64)
  classes = idlib.equivalence_classes(num_nodes, a, b)
  gids = idlib.global_ids(classes, owns)
  (work / "global").mkdir(exist_ok=True)
  for index in range(tiling.num_chunks):
    path = work / "global" / f"{plan.names[index]}.npy"
    with atomic_path(path, suffix=".npy") as tmp, open(tmp, "wb") as f:
      np.save(f, gids[offsets[index]:offsets[index + 1]])
  chunk_of_node = np.repeat(np.arange(tiling.num_chunks, dtype=np.int64), np.diff(offsets))
  num_objects = int(gids.max()) if gids.size else 0
  nodes_per_object = np.bincount(gids.astype(np.int64), minlength=num_objects + 1)[1:]
  _save_npz(work / "idmap.npz",
            chunk_corners_xyz=np.array([zyx_to_xyz(c) for c in tiling.chunk_corners], np.int64),
            chunk=chunk_of_node, local_id=np.concatenate(ids_per_chunk) if ids_per_chunk
            else np.zeros(0, np.uint64), global_id=gids)
  per_chunk = {plan.names[i]: {"objects": int(len(ids_per_chunk[i])),
                               "owned_objects": int(len(owned_per_chunk[i]))}
               for i in range(tiling.num_chunks)}
  return {"objects": num_objects, "nodes": num_nodes,
          "objects_merged_across_seams": int((nodes_per_object > 1).sum()),
          "nodes_without_output_voxels": int((gids == 0).sum()), "overlaps": totals,
          "voxels_filled_from_other_chunks": filled_voxels,
          "per_chunk": per_chunk}


# ---------------------------------------------------------------------------------- run

@dataclasses.dataclass
class JobControl:
  """How the array phases run: cluster options and task counts."""
  options: Any  # slurm.executor.SlurmOptions
  num_tasks: int | None = 16
  items_per_task: int = 1
  retry_failed: bool = False


def _run_phase(name: str, plan: Plan, worker: Worker, items: list[WorkItem], jobs: JobControl) -> None:
  run_dir = plan.work_dir / name
  check_manifest(run_dir, plan.manifest(), items)
  started = time.monotonic()
  status = run_array(run_dir, worker, items, jobs.options, chunks_per_task=jobs.items_per_task,
                     max_tasks=jobs.num_tasks, retry_failed=jobs.retry_failed, wait=True,
                     poll_s=1.0)
  failed = status.count("failed")
  not_done = len(items) - status.count("done")
  if failed or not_done:
    lines = [line for line in status_lines(status) if line.startswith("failed:")]
    raise FFNError(f"stitch phase {name}: {not_done} of {len(items)} blocks not done "
                   f"({lines[0] if lines else 'see ' + str(run_dir)}); rerun the same command "
                   "(with --retry_failed for failed blocks) to resume")
  _log.info("phase %s: %d blocks in %.1f s", name, len(items), time.monotonic() - started)


def _memory_of(paths: Sequence[Path], reader) -> dict[str, int]:
  growth = [reader(p) for p in paths]
  if not growth:
    return {}
  return {"max_peak_rss_kib": max(g["peak_rss_kib"] for g in growth),
          "max_growth_kib": max(g["peak_rss_kib"] - g["baseline_rss_kib"] for g in growth)}


def _npz_json(path: Path, key: str) -> dict:
  with np.load(path) as data:
    return json.loads(str(data[key]))


def chunk_items(plan: Plan) -> list[WorkItem]:
  return [WorkItem(f"{i}:{plan.names[i]}", _bbox(plan.tiling.chunk_box(i)),
                   _bbox(plan.tiling.chunk_box(i)), _voxels(plan.tiling.chunk_box(i)))
          for i in range(plan.tiling.num_chunks)]


def match_items(plan: Plan) -> list[WorkItem]:
  """One item per chunk; cost: the voxels of its overlaps with later chunks twice (matching)
  plus those of all its overlaps once (the fill)."""
  items = []
  later = forward_pairs(plan.tiling)
  for i, others in enumerate(neighbours(plan.tiling)):
    box = plan.tiling.chunk_box(i)
    cost = sum((3 if j in later.get(i, []) else 1)
               * _voxels(intersect(box, plan.tiling.chunk_box(j))) for j in others)  # type: ignore[arg-type]
    items.append(WorkItem(f"{i}:{plan.names[i]}", _bbox(box), _bbox(box), max(cost, 1)))
  return items


def block_items(plan: Plan) -> list[WorkItem]:
  blocks = write_blocks(plan.tiling.region_corner, plan.tiling.region_shape,
                        plan.params.block_zyx)
  return [WorkItem(_name(b[0]), _bbox(b), _bbox(b), _voxels(b)) for b in blocks]


def stitch(plan: Plan, jobs: JobControl) -> dict[str, Any]:
  """Runs (or resumes) every phase of a checked plan; returns the summary (also saved)."""
  work = plan.work_dir
  times: dict[str, float] = {}
  for sub in ("chunks", "pairs", "global", "blocks"):
    (work / sub).mkdir(parents=True, exist_ok=True)
  if not (work / PLAN).exists():
    write_text_atomic(work / PLAN, json.dumps(plan.manifest(), indent=1) + "\n")
  t0 = time.monotonic()
  chunks = chunk_items(plan)
  _run_phase("extract", plan, ExtractWorker(work, plan.tiling, plan.source), chunks, jobs)
  times["extract_s"] = time.monotonic() - t0
  t0 = time.monotonic()
  matches = match_items(plan)
  _run_phase("match", plan, MatchWorker(work, plan.tiling, plan.params.min_agreement,
                                        plan.params.min_overlap), matches, jobs)
  times["match_s"] = time.monotonic() - t0
  t0 = time.monotonic()
  resolved = resolve(plan)
  times["resolve_s"] = time.monotonic() - t0
  t0 = time.monotonic()
  staging = plan.staging()
  layout = plan.layout()
  if not os.path.exists(staging.path):
    create_labels(staging, layout)
  blocks = block_items(plan)
  _run_phase("write", plan, WriteWorker(work, plan.tiling, staging), blocks, jobs)
  times["write_s"] = time.monotonic() - t0
  memory = {
      "extract": _memory_of([work / "chunks" / f"{n}.npz" for n in plan.names],
                            lambda p: _npz_json(p, "memory")),
      "match": _memory_of([work / "pairs" / f"{plan.names[int(it.id.split(':')[0])]}.npz"
                           for it in matches], lambda p: _npz_json(p, "memory")),
      "write": _memory_of([work / "blocks" / f"{it.id}.json" for it in blocks],
                          lambda p: json.loads(p.read_text()))}
  summary = {"output": str(plan.output), "id_map": str(work / "idmap.npz"),
             "region_xyz": {"start": list(zyx_to_xyz(plan.tiling.region_corner)),
                            "size": list(zyx_to_xyz(plan.tiling.region_shape))},
             "grid_xyz": list(plan.tiling.grid_shape[::-1]), "chunks": plan.tiling.num_chunks,
             "overlapping_pairs": len(plan.tiling.pairs()), "output_blocks": len(blocks),
             **{k: v for k, v in resolved.items() if k != "per_chunk"},
             "parameters": {k: v for k, v in plan.manifest().items()
                            if k not in ("chunks_xyz", "stage")},
             "seconds": {k: round(v, 3) for k, v in times.items()}, "memory": memory,
             "per_chunk": resolved["per_chunk"]}
  write_text_atomic(work / "summary.json", json.dumps(summary, indent=1) + "\n")
  # Last: the output appears whole, after everything else is in place.
  if plan.output.format == "h5":
    copy_to_h5(staging, plan.output, layout, plan.params.block_zyx)
    shutil.rmtree(staging.path)
  else:
    os.replace(staging.path, plan.output.path)
  return summary
