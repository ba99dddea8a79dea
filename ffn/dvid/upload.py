"""``ffn dvid upload``: a label volume as the supervoxels of a DVID ``labelmap`` instance.

The volume (any spec: ``path.h5:dataset``, ``zarr://``, ``precomputed://``, a TensorStore spec,
or a PNG/TIFF stack) goes to the box of DVID's voxel space starting at ``offset_xyz`` (default:
the volume's own ``voxel_offset_xyz``, as stitched outputs store it, else 0). DVID takes ``raw``
voxels only in whole blocks of the instance's block size, so the box is widened to the block grid;
voxels of those edge blocks outside the volume are sent as 0 (background) and replace whatever the
blocks held.

Work: chunks of ``chunk_blocks`` blocks per axis, each one ``POST raw/0_1_2/<size>/<offset>``
(uint64 little-endian, z,y,x), as one job array (:mod:`ffn.blockwise`; ``--cluster debug`` runs
in this process). A chunk is done when its record ``<run_dir>/chunks/<id>.json`` (written
atomically after DVID accepted the POST, with the chunk's label counts) exists, so a re-run of the
same command posts only the rest; ``manifest.json`` refuses a re-run with other settings. Then it
waits until DVID's label index (built asynchronously after the POSTs) gives every uploaded label
exactly its uploaded voxel count (``GET sizes?supervoxels=true``) before reporting success.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ffn.axes import BoundingBox
from ffn.blockwise import RunStatus, WorkItem, Worker, check_manifest, plan, run_array, status_lines
from ffn.dvid.client import DvidClient
from ffn.errors import FFNError
from ffn.io.atomic import write_text_atomic
from ffn.progress import Progress

_log = logging.getLogger(__name__)

SIZES_BATCH = 5000  # labels per `GET sizes` while waiting for the label index


@dataclasses.dataclass(frozen=True)
class Source:
  """A label volume: ``shape_zyx`` voxels starting at ``offset_zyx`` (its stored voxel offset)."""
  spec: str
  shape_zyx: tuple[int, int, int]
  offset_zyx: tuple[int, int, int]

  def read(self, corner_zyx: Sequence[int], shape_zyx: Sequence[int]) -> np.ndarray:
    """Labels of a box inside the volume (absolute corner, z,y,x) as uint64."""
    from ffn.io.tensorstore_volumes import parse_labels_spec, read_labels
    from ffn.io.volumes import Volume
    try:
      labels_spec = parse_labels_spec(self.spec)
    except FFNError:
      labels_spec = None
    if labels_spec is not None:
      data, _ = read_labels(labels_spec, corner_zyx, shape_zyx)
    else:
      with Volume(self.spec) as volume:
        data = volume[tuple(slice(int(c) - o, int(c) - o + int(n))
                            for c, o, n in zip(corner_zyx, self.offset_zyx, shape_zyx))]
    if data.dtype.kind not in "uib":
      raise FFNError(f"{self.spec}: dtype {data.dtype.name} is not a label dtype (integers)")
    if data.dtype.kind == "i" and data.size and data.min() < 0:
      raise FFNError(f"{self.spec}: has negative ids (min {data.min()}); ids must be >= 0")
    return data.astype(np.uint64, copy=False)


def open_source(spec: str) -> Source:
  """Shape and stored offset of a label volume spec (nothing read but metadata)."""
  from ffn.io import tensorstore_volumes as tsv
  from ffn.io.volumes import Volume, check_dtype, open_h5_dataset
  try:
    labels_spec = tsv.parse_labels_spec(spec)
  except FFNError:
    labels_spec = None
  if labels_spec is None:
    with Volume(spec) as volume:
      check_dtype(spec, volume.dtype, "uib")
      return Source(spec, tuple(volume.shape), (0, 0, 0))  # type: ignore[arg-type]
  if labels_spec.format == "h5":
    f, ds = open_h5_dataset(f"{labels_spec.path}:{labels_spec.dataset}")
    with f:
      if ds.ndim != 3:
        raise FFNError(f"{spec}: expected a 3D (z,y,x) dataset, got shape {ds.shape}")
      check_dtype(spec, ds.dtype, "uib")
      offset = tuple(int(v) for v in ds.attrs.get("voxel_offset_xyz", (0, 0, 0))[::-1])
      return Source(spec, tuple(int(n) for n in ds.shape), offset)  # type: ignore[arg-type]
  import tensorstore as ts
  try:
    store = ts.open(tsv._ts_spec(labels_spec, None), context=tsv._context(), open=True).result()
  except ValueError as e:
    raise FFNError(f"{spec}: cannot open the volume ({e})") from None
  shape = store.shape if labels_spec.format == "zarr" else store.shape[:3][::-1]
  return Source(spec, tuple(int(n) for n in shape),  # type: ignore[arg-type]
                tsv._offset_of(labels_spec, store))


def _source_path(spec: str) -> str:
  """The file or folder of a volume spec (for the default run directory beside it)."""
  from ffn.io.tensorstore_volumes import parse_labels_spec
  from ffn.io.volumes import parse_spec
  try:
    return parse_labels_spec(spec).path
  except FFNError:
    return parse_spec(spec).path


def chunk_boxes(start_xyz: Sequence[int], size_xyz: Sequence[int], block_xyz: Sequence[int],
                chunk_blocks: int) -> list[BoundingBox]:
  """Chunks (x,y,z boxes) of ``chunk_blocks`` blocks per axis that cover the box on DVID's
  block grid (block-aligned corners and sizes; the last chunk of an axis may be smaller)."""
  lo = [math.floor(s / b) * b for s, b in zip(start_xyz, block_xyz)]
  hi = [math.ceil((s + n) / b) * b for s, n, b in zip(start_xyz, size_xyz, block_xyz)]
  step = [b * chunk_blocks for b in block_xyz]
  boxes = []
  for z in range(lo[2], hi[2], step[2]):
    for y in range(lo[1], hi[1], step[1]):
      for x in range(lo[0], hi[0], step[0]):
        corner = (x, y, z)
        boxes.append(BoundingBox(corner, [min(st, h - c) for st, h, c in zip(step, hi, corner)]))
  return boxes


class UploadWorker(Worker):
  """Posts chunks (each task its own DVID client); pickled to the tasks."""

  _client: DvidClient | None = None  # per task, not pickled

  def __init__(self, run_dir: str, client_args: dict[str, Any], uuid: str, instance: str,
               source: Source, offset_xyz: Sequence[int]):
    self.run_dir = run_dir
    self.client_args = client_args
    self.uuid = uuid
    self.instance = instance
    self.source = source
    self.offset_xyz = [int(v) for v in offset_xyz]

  def record_path(self, item: WorkItem) -> Path:
    return Path(self.run_dir) / "chunks" / f"{item.id}.json"

  def is_done(self, item: WorkItem) -> bool:
    return self.record_path(item).exists()

  def chunk_labels(self, item: WorkItem) -> np.ndarray:
    """The chunk's voxels (z,y,x uint64): the volume where it covers the chunk, else 0."""
    box = item.write_box
    size_xyz = self.source.shape_zyx[::-1]
    lo = [max(int(s), o) for s, o in zip(box.start, self.offset_xyz)]
    hi = [min(int(e), o + n) for e, o, n in zip(box.end, self.offset_xyz, size_xyz)]
    out = np.zeros(box.shape_zyx(), np.uint64)
    if all(h > l for l, h in zip(lo, hi)):
      corner_zyx = [l - o + so for l, o, so in zip(lo[::-1], self.offset_xyz[::-1],
                                                    self.source.offset_zyx)]
      data = self.source.read(corner_zyx, [h - l for l, h in zip(lo[::-1], hi[::-1])])
      out[tuple(slice(l - int(s), h - int(s)) for l, h, s in
                zip(lo[::-1], hi[::-1], box.start[::-1]))] = data
    return out

  def process(self, item: WorkItem) -> None:
    if self._client is None:
      self._client = DvidClient(**self.client_args)
    labels = self.chunk_labels(item)
    self._client.post_raw(self.uuid, self.instance, item.write_box.start, labels)
    ids, counts = np.unique(labels, return_counts=True)
    keep = ids != 0
    write_text_atomic(self.record_path(item), json.dumps(
        {"labels": ids[keep].tolist(), "voxels": counts[keep].tolist()}) + "\n")


def expected_sizes(worker: UploadWorker, items: Sequence[WorkItem]) -> dict[int, int]:
  """Voxels of every uploaded label, summed over the chunk records."""
  totals: dict[int, int] = {}
  for item in items:
    record = json.loads(worker.record_path(item).read_text())
    for label, n in zip(record["labels"], record["voxels"]):
      totals[label] = totals.get(label, 0) + n
  return totals


def wait_for_index(client: DvidClient, uuid: str, instance: str, expected: dict[int, int],
                   timeout_s: float, poll_s: float = 0.25) -> float:
  """Polls ``sizes?supervoxels=true`` until DVID's index gives every label its expected voxel
  count; returns the seconds waited. FFNError after ``timeout_s``."""
  labels = sorted(expected)
  start = time.monotonic()
  pending = labels
  with Progress(len(labels), "label index", unit="label", log_every_s=10.0) as progress:
    while True:
      still: list[int] = []
      seen: dict[int, int] = {}
      for i in range(0, len(pending), SIZES_BATCH):
        batch = pending[i:i + SIZES_BATCH]
        for label, size in zip(batch, client.sizes(uuid, instance, batch, supervoxels=True)):
          if size != expected[label]:
            still.append(label)
            seen[label] = size
      progress.update(len(pending) - len(still))
      pending = still
      waited = time.monotonic() - start
      if not pending:
        return waited
      if waited > timeout_s:
        label = pending[0]
        raise FFNError(
            f"DVID {client.server}: after {waited:.0f} s the label index still disagrees for "
            f"{len(pending)} of {len(labels)} uploaded labels (e.g. supervoxel {label}: "
            f"{seen[label]} voxels indexed, {expected[label]} uploaded); run the same command "
            "again to wait longer (--index_timeout_s), or check that nothing else writes there")
      time.sleep(poll_s)
      poll_s = min(5.0, poll_s * 1.5)


def upload(client: DvidClient, uuid: str, instance: str, spec: str, run_dir: str | None,
           options, offset_xyz: Sequence[int] | None = None, chunk_blocks: int = 2,
           num_tasks: int = 16, retry_failed: bool = False,
           index_timeout_s: float = 600.0) -> dict[str, Any]:
  """Uploads ``spec`` (see the module docstring); returns a summary. ``options``:
  :class:`slurm.executor.SlurmOptions`; FFNError on bad input or when chunks failed."""
  if chunk_blocks < 1:
    raise FFNError(f"--chunk_blocks must be at least 1, got {chunk_blocks}")
  source = open_source(spec)
  info = client.labelmap_info(uuid, instance)
  full = client.full_uuid(uuid)
  if client.node_locked(full):
    raise FFNError(f"DVID {client.server}: node {full} is committed (locked) and takes no voxels; "
                   "upload to an open node (`ffn dvid newversion` makes a child)")
  block_xyz = [int(v) for v in info["Extended"]["BlockSize"]]
  offset = ([int(v) for v in offset_xyz] if offset_xyz is not None
            else list(source.offset_zyx[::-1]))
  size_xyz = list(source.shape_zyx[::-1])
  boxes = chunk_boxes(offset, size_xyz, block_xyz, chunk_blocks)
  items = plan(boxes)
  run = Path(run_dir or f"{_source_path(spec).rstrip('/')}.dvid_upload").absolute()
  check_manifest(run, {"kind": "dvid upload", "server": client.server, "uuid": full,
                       "instance": instance, "source": spec,
                       "source_shape_zyx": list(source.shape_zyx), "offset_xyz": offset,
                       "block_size_xyz": block_xyz, "chunk_blocks": chunk_blocks}, items)
  client_args = {"server": client.server, "user": client.user, "app": client.app,
                 "timeout_s": client.timeout[1], "retries": client.retries}
  worker = UploadWorker(str(run), client_args, full, instance, source, offset)
  _log.info("uploading %s (%s x,y,z voxels) to DVID %s node %s instance %r at %s (x,y,z): "
            "%d chunks of up to %s voxels; run directory %s", spec,
            "x".join(map(str, size_xyz)), client.server, full, instance, offset, len(items),
            "x".join(str(b * chunk_blocks) for b in block_xyz), run)
  started = time.monotonic()
  status: RunStatus = run_array(run, worker, items, options, max_tasks=num_tasks,
                                retry_failed=retry_failed, wait=True)
  if status.count("done") != len(items):
    for line in status_lines(status, noun="chunks"):
      _log.error("%s", line)
    raise FFNError(f"{run}: {len(items) - status.count('done')} of {len(items)} chunks not "
                   "uploaded (see above); run the same command again (--retry_failed for failed "
                   "tasks)")
  posted_s = time.monotonic() - started
  expected = expected_sizes(worker, items)
  waited = wait_for_index(client, full, instance, expected, index_timeout_s)
  return {"server": client.server, "uuid": full, "instance": instance, "source": spec,
          "offset_xyz": offset, "size_xyz": size_xyz, "chunks": len(items),
          "labels": len(expected), "voxels": int(sum(expected.values())),
          "post_s": round(posted_s, 2), "index_wait_s": round(waited, 2), "run_dir": str(run)}
