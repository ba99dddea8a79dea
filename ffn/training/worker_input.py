"""``--strategy async --async_input worker``: examples built on the workers, FOV moves in-graph.

With ``--async_input coordinator`` (:class:`ffn.training.distributed.AsyncTrainer`) the
coordinator builds every batch in Python and ships it to a worker (x, labels and back the logits:
about 2.3 MB per step for batch 4 at a 33^3 FOV), blocking on each worker's previous result. Here
the coordinator only schedules:

* **Volumes on the workers.** Each worker holds every image (as float32) and label volume (as
  int64) in its CPU memory, the single element (repeated) of its per-worker ``tf.data`` dataset
  (``ClusterCoordinator.create_per_worker_dataset``), read from disk by the worker itself: an
  uncompressed, contiguous HDF5 dataset of a dtype ``tf.io.decode_raw`` reads is read in place;
  any other volume (gzip/chunked HDF5, TensorStore, slice stacks) is
  written once by the coordinator as a raw copy into ``<train_dir>/worker_volumes/`` (named by a
  hash of its spec, shape, dtype and file stamp; reused on resume), so the ``--train_dir`` that
  every node must see already suffices.
* **Scheduling.** The coordinator keeps the example stream of :class:`ExampleSource` by index:
  per example it sends the box (volume and z,y,x corner), the normalisation, the
  axis permutation/reflection (the same per-index RNG ``(seed, 1, index)`` as the eager path) and
  the move order (``(seed, 2, index)``), about 370 bytes per example, and keeps up to two calls in
  flight per worker.
* **In-graph FOV loop** (:meth:`InGraphFov.train_examples`). One scheduled call trains
  ``--batches_per_call`` x ``batch_size`` whole examples on a worker in ``batch_size`` slots
  (more examples per call divide the coordinator's fixed cost per call, ~10-30 ms of CPU on the
  benchmark machine); it slices their patches (on the worker's CPU, where the
  volumes are; the steps run on its default device, a GPU if it has one), makes google's soft
  labels (0.95 on the object at the centre voxel, 0.05 elsewhere), permutes/reflects, starts the seed
  canvas (``seed_pad`` everywhere, 0.95 at the centre, as logits) and runs the FOV policy as a
  ``tf.while_loop``. Each iteration is one training step: forward pass, sigmoid cross-entropy,
  each gradient element clipped to +/- ``max_gradient_entry_mag``, the optimizer's update of the
  variables on the parameter servers, global step + 1; the logits are written into the seed
  canvas, then every slot's example chooses its next FOV from the updated canvas, and a slot
  whose example has no FOV left takes the call's next example at once (google's batches of
  independent example generators, as ``ffn train``): ``fixed`` takes the
  next of its moves (centre first, then the 26 +/- deltas shifts) whose seed voxel reaches
  ``logit(threshold)`` (google's ``fixed_offsets``); ``max_pred_moves`` queues the face maxima
  of the prediction as inference moves (google's ``max_pred_offsets``,
  :func:`ffn.training.examples.max_pred_policy`).

Semantics against ``ffn train``'s eager batches: the same steps, except at the end of a call,
where a slot without a next example idles (weight 0 in the loss) until the call's last example
ends. A call stops early when it reaches its step budget (the coordinator hands out budgets so that training ends
exactly at ``max_steps``). Not supported (an FFNError when the job is submitted): the EM
augmentations beyond permutation/reflection (rotation, elastic, misalignment, missing/blurred
sections, brightness/contrast/gamma, noise).

Status (benchmarks/README.md, bench_distributed.py --part loss): in one process and with one
worker the loss falls as with ``ffn train``; with two concurrent workers it was unstable in our
runs (tiny model on the shipped crop: 2.5 -> 0.5, then up to 3.8 by step 560) where
``--async_input coordinator`` with two workers falls steadily (2.4 -> 0.29); the cause is not
found yet, so ``coordinator`` stays the default.

Data-stream position: ``examples_taken`` (in the checkpoint, as before) counts the stream
positions handed out; a resumed run continues at that index, so the stream is the same one.
Examples in flight at a checkpoint are not resumed (as with the eager path).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import os
import time
from typing import Sequence

import numpy as np

from ffn.axes import xyz_to_zyx
from ffn.errors import FFNError
from ffn.training.examples import fov_shifts, initial_seed, logit

_log = logging.getLogger("ffn.training")

# Numpy dtypes (little-endian) that tf.io.decode_raw reads.
_DECODE = ("u1", "i1", "u2", "i2", "i4", "i8", "f2", "f4", "f8", "u4", "u8")
# Augmentation flags the in-graph path cannot apply (only permutation/reflection are in-graph).
_UNSUPPORTED_AUGMENT = ("rotation_max_deg", "elastic_alpha", "misalign_prob", "missing_section_prob",
                        "blur_section_prob", "brightness", "contrast", "gamma", "noise_stddev")
CACHE_DIR = "worker_volumes"


def check_config(cfg) -> None:
  """Raises FFNError when a :class:`~ffn.training.trainer.TrainConfig` (or the parsed ``ffn
  train`` flags, same names) needs what the worker-side input does not do (module docstring)."""
  used = [f"--{name}" for name in _UNSUPPORTED_AUGMENT if getattr(cfg, name)]
  if used:
    raise FFNError(f"--async_input worker applies only the axis permutation/reflection in-graph; "
                   f"{', '.join(used)} need{'s' if len(used) == 1 else ''} --async_input coordinator")


@dataclasses.dataclass(frozen=True)
class RawVolume:
  """A z,y,x volume stored as raw little-endian bytes at ``offset`` in ``path``."""
  path: str
  offset: int  # bytes
  shape: tuple[int, int, int]  # z,y,x
  dtype: str  # numpy dtype string, e.g. "<u1"
  file_size: int  # bytes

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def _in_place(spec) -> RawVolume | None:
  """The raw view of an uncompressed contiguous 3D HDF5 dataset in a decodable dtype, else None."""
  import h5py
  if spec.scheme is not None or spec.dataset is None or spec.channel is not None:
    return None
  with h5py.File(spec.path, "r") as f:
    ds = f[spec.dataset]
    offset, kind = ds.id.get_offset(), ds.dtype.str
    if (ds.chunks is not None or ds.compression is not None or offset is None or ds.ndim != 3
        or kind[0] not in "<|" or kind[1:] not in _DECODE):
      return None
    return RawVolume(os.path.abspath(spec.path), int(offset), tuple(int(s) for s in ds.shape),
                     "<" + kind[1:], os.path.getsize(spec.path))


def _cached(spec, array: np.ndarray, kind: str, cache_dir: str) -> RawVolume:
  """A raw copy of ``array`` (images as float32, labels as int64) in ``cache_dir``, written once."""
  from ffn.io.atomic import atomic_path
  dtype = np.dtype("<f4") if kind == "image" else np.dtype("<i8")
  stamp = ""
  if os.path.exists(spec.path):
    st = os.stat(spec.path)
    stamp = f"{st.st_size}:{st.st_mtime_ns}"
  key = hashlib.sha1(f"{spec}|{array.shape}|{array.dtype}|{stamp}".encode()).hexdigest()[:16]
  path = os.path.join(cache_dir, f"{kind}-{key}.raw")
  nbytes = int(np.prod(array.shape)) * dtype.itemsize
  if not (os.path.exists(path) and os.path.getsize(path) == nbytes):
    os.makedirs(cache_dir, exist_ok=True)
    with atomic_path(path) as tmp:
      # uint64 labels keep their identity as int64 bit patterns (only equality is used).
      data = array.view(np.int64) if array.dtype == np.uint64 else array
      np.ascontiguousarray(data, dtype=dtype).tofile(tmp)
    _log.info("worker input: %s copied raw to %s", spec, path)
  return RawVolume(path, 0, tuple(int(s) for s in array.shape), dtype.str, nbytes)


class WorkerVolumes:
  """Every volume of an :class:`ExampleSource` as raw files the workers read (module docstring)."""

  def __init__(self, source, cache_dir: str):
    self.names = list(source.images)
    self.images: list[RawVolume] = []
    self.labels: list[RawVolume] = []
    for name in self.names:
      for kind, src, out in (("image", source.images[name], self.images),
                             ("labels", source.labels[name], self.labels)):
        raw = _in_place(src.volume.spec)
        if raw is None:
          array = src.array if src.array is not None else src.volume.read_all()
          raw = _cached(src.volume.spec, array, kind, cache_dir)
        out.append(raw)
    self.index = {n: i for i, n in enumerate(self.names)}

  def dataset(self):
    """The per-worker dataset: one element (images float32, labels int64: tuples of z,y,x
    volumes in ``names`` order), repeated."""
    import tensorflow as tf

    def read(v: RawVolume, out_dtype) -> tf.Tensor:
      records = tf.data.FixedLengthRecordDataset(
          v.path, record_bytes=v.nbytes, header_bytes=v.offset,
          footer_bytes=v.file_size - v.offset - v.nbytes)
      raw = tf.io.decode_raw(records.get_single_element(), tf.as_dtype(np.dtype(v.dtype)))
      return tf.reshape(tf.cast(raw, out_dtype), v.shape)

    images = tuple(read(v, tf.float32) for v in self.images)
    labels = tuple(read(v, tf.int64) for v in self.labels)
    return tf.data.Dataset.from_tensors((images, labels)).repeat()


def augment_params(rng: np.random.Generator, permutable_axes: Sequence[int],
                   reflectable_axes: Sequence[int]) -> tuple[list[int], list[bool]]:
  """(transpose permutation, flip per axis z,y,x) drawn exactly as
  :func:`ffn.training.examples.augment` draws them from ``rng``."""
  perm = list(range(3))
  if len(permutable_axes) > 1:
    shuffled = rng.permutation(list(permutable_axes))
    for src, dst in zip(permutable_axes, shuffled):
      perm[src] = int(dst)
  flips = [False] * 3
  for a in reflectable_axes:
    if rng.random() > 0.5:
      flips[a] = True
  return perm, flips


class Planner:
  """The coordinator's side: stream indices -> the small per-example arguments of a call."""

  def __init__(self, source, volumes: WorkerVolumes, batch_size: int, deltas_xyz: Sequence[int],
               shuffle_moves: bool):
    self.source, self.volumes, self.batch_size = source, volumes, batch_size
    self.shifts = np.array([(0, 0, 0)] + fov_shifts(deltas_xyz), np.int64)  # x,y,z
    self.shuffle_moves = shuffle_moves

  def moves_zyx(self, index: int) -> np.ndarray:
    """[27, 3] FOV offsets (z,y,x) of example ``index``: the centre, then the shifts."""
    order = self.shifts.copy()
    if self.shuffle_moves:
      np.random.default_rng([self.source.seed, 2, int(index)]).shuffle(order[1:])
    return order[:, ::-1].astype(np.int32)

  def plan(self, first: int, count: int | None = None) -> dict[str, np.ndarray]:
    """Arguments of :meth:`InGraphFov.train_examples` for stream positions first..first+count-1
    (``count``: ``batch_size`` x the calls's batches; default one batch)."""
    src, vols = self.source, self.volumes
    count = self.batch_size if count is None else count
    rows = [src.coordinate(i) for i in range(first, first + count)]
    out: dict[str, list] = collections.defaultdict(list)
    for index, row in zip(range(first, first + count), rows):
      name = src.names[row]
      out["volume"].append(vols.index[name])
      out["start"].append(src.starts_xyz[row][::-1])
      perm, flips = augment_params(np.random.default_rng([src.seed, 1, index]),
                                   src.permutable_axes, src.reflectable_axes)
      out["perm"].append(perm)
      out["flips"].append(flips)
      out["offset_scale"].append(src.offset_scale[name])
      out["moves"].append(self.moves_zyx(index))
    return {"volume": np.array(out["volume"], np.int32),
            "start": np.array(out["start"], np.int32),
            "perm": np.array(out["perm"], np.int32), "flips": np.array(out["flips"], bool),
            "offset_scale": np.array(out["offset_scale"], np.float32),
            "moves": np.stack(out["moves"])}


class InGraphFov:
  """The worker's side: ``train_examples`` as one ``tf.function`` (see the module docstring)."""

  def __init__(self, trainer, patch_zyx: Sequence[int], batches: int = 1):
    """``batches``: batches of ``batch_size`` examples trained one after the other per call."""
    import tensorflow as tf
    if batches < 1:
      raise FFNError(f"--batches_per_call must be >= 1, got {batches}")
    self.trainer, self.cfg, self.batches = trainer, trainer.cfg, batches
    self.patch = tuple(int(s) for s in patch_zyx)
    self.fov = tuple(int(s) for s in trainer.fov_zyx)
    perm_axes = list(self.cfg.permutable_axes)
    if len({self.patch[a] for a in perm_axes}) > 1:
      raise FFNError(f"--permutable_axes {perm_axes}: the example patch {self.patch} (z,y,x) differs "
                     f"in size along them")
    self.seed0 = np.broadcast_to(initial_seed(self.patch, pad=self.cfg.seed_pad),
                                 (self.cfg.batch_size,) + self.patch).copy()
    if self.cfg.fov_policy == "max_pred_moves":  # at most one visit per cell
      self.max_visits = int(np.prod(_cells(self.patch, self.fov,
                                           xyz_to_zyx(trainer.model.deltas))[1]))
    else:  # the centre and the 26 shifts
      self.max_visits = 1 + len(fov_shifts(trainer.model.deltas))
    self.train_examples = tf.function(self._call)

  def examples(self, images, labels, volume, start, perm, flips, offset_scale):
    """(image [n,z,y,x] normalised, soft labels [n,z,y,x]) float32, as ExampleSource.example.

    ``images``/``labels``: the per-worker dataset's volumes; ``volume`` [n] and ``start`` [n, 3]
    (z,y,x): each example's volume and patch corner (n: static)."""
    import tensorflow as tf
    pz, py, px = self.patch

    def box(volumes, i):
      return tf.switch_case(volume[i], [lambda v=v: tf.slice(v, start[i], self.patch) for v in volumes])

    out = []
    for i in range(volume.shape[0]):
      image = (box(images, i) - offset_scale[i, 0]) / offset_scale[i, 1]
      labels_i = box(labels, i)
      soft = tf.where((labels_i == labels_i[pz // 2, py // 2, px // 2]) & (labels_i > 0),
                      tf.constant(0.95, tf.float32), tf.constant(0.05, tf.float32))
      # np.transpose(a, perm) then np.flip over the flipped axes, both arrays in one go.
      pair = tf.transpose(tf.stack([image, soft]), tf.concat([[0], perm[i] + 1], 0))
      pair = tf.reverse(pair, tf.boolean_mask(tf.range(1, 4), flips[i]))
      pair.set_shape((2,) + self.patch)
      out.append(pair)
    out = tf.stack(out)
    return out[:, 0], out[:, 1]

  def _step(self, x, labels, weights):
    """One training step on the active examples (``weights`` 1/0); returns (logits, loss)."""
    import tensorflow as tf
    t = self.trainer
    with tf.GradientTape() as tape:
      logits = t.model(x, compute_dtype=tf.as_dtype(self.cfg.compute_dtype))
      xent = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
      per_example = tf.reduce_mean(xent, axis=[1, 2, 3, 4])
      loss = tf.reduce_sum(per_example * weights) / tf.reduce_sum(weights)
    t.apply_gradients(tape.gradient(loss, t.variables))
    return logits, loss

  def _call(self, iterator, volume, start, perm, flips, offset_scale, moves, budget):
    images, labels = next(iterator)
    return self.trainer.strategy.run(
        self._loop, args=(images, labels, volume, start, perm, flips, offset_scale, moves, budget))

  def _loop(self, images, labels, volume, start, perm, flips, offset_scale, moves, budget):
    """(steps taken int64, mean loss over them, FOVs visited per example [m] int32) for the
    call's m = batches x batch_size examples, trained in batch_size slots."""
    import tensorflow as tf
    b, m = self.cfg.batch_size, self.batches * self.cfg.batch_size
    with tf.device("/device:CPU:0"):  # where the volumes are; only the patches go to a GPU
      image, soft = self.examples(images, labels, volume, start, perm, flips, offset_scale)
    half = tf.constant([s // 2 for s in self.patch], tf.int32)
    fov_half = tf.constant([f // 2 for f in self.fov], tf.int32)
    policy = (_MaxPredPolicy(self) if self.cfg.fov_policy == "max_pred_moves"
              else _FixedPolicy(self, moves))
    seed0 = tf.constant(self.seed0[0])

    def refill(seed, cur, off, active, state, taken):
      """Each idle slot (slot order) takes the call's next example: seed and policy restart."""
      want = ~active
      take = want & (taken + tf.cumsum(tf.cast(want, tf.int32), exclusive=True) < m)
      cur = tf.where(take, taken + tf.cumsum(tf.cast(take, tf.int32), exclusive=True), cur)
      seed = tf.where(take[:, None, None, None], seed0[None], seed)
      off_new, active_new, state = policy.start(seed, cur, take, state)
      return (seed, cur, tf.where(take[:, None], off_new, off), tf.where(take, active_new, active),
              state, taken + tf.reduce_sum(tf.cast(take, tf.int32)))

    def body(n, seed, cur, off, active, state, taken, loss_sum, visits):
      corner = half + off - fov_half  # [b, 3] z,y,x corner of each FOV in its patch
      xs, ys = [], []
      for i in range(b):
        xs.append(tf.stack([tf.slice(image[cur[i]], corner[i], self.fov),
                            tf.slice(seed[i], corner[i], self.fov)], axis=-1))
        ys.append(tf.slice(soft[cur[i]], corner[i], self.fov)[..., None])
      logits, loss = self._step(tf.stack(xs), tf.stack(ys), tf.cast(active, tf.float32))
      updated = []
      for i in range(b):
        pad = tf.stack([corner[i], tf.constant(self.patch, tf.int32) - corner[i] - self.fov], axis=1)
        box = tf.pad(tf.ones(self.fov, tf.bool), pad) & active[i]
        updated.append(tf.where(box, tf.pad(logits[i, ..., 0], pad), seed[i]))
      seed = tf.stack(updated)
      visits = tf.tensor_scatter_nd_add(visits, cur[:, None], tf.cast(active, tf.int32))
      off, active, state = policy.next(seed, off, active, state, cur)
      seed, cur, off, active, state, taken = refill(seed, cur, off, active, state, taken)
      return n + 1, seed, cur, off, active, state, taken, loss_sum + loss, visits

    init = refill(tf.tile(seed0[None], [b, 1, 1, 1]), tf.zeros([b], tf.int32),
                  tf.zeros([b, 3], tf.int32), tf.zeros([b], tf.bool), policy.init(),
                  tf.constant(0, tf.int32))
    seed, cur, off, active, state, taken = init
    n, *_, loss_sum, visits = tf.while_loop(
        lambda n, seed, cur, off, active, *rest: (n < budget) & tf.reduce_any(active), body,
        (tf.constant(0, tf.int64), seed, cur, off, active, state, taken, tf.constant(0.0),
         tf.zeros([m], tf.int32)))
    return n, loss_sum / tf.cast(tf.maximum(n, 1), tf.float32), visits


def _cells(patch_zyx, fov_zyx, deltas_zyx) -> tuple[list[int], tuple[int, int, int]]:
  """(lowest cell index, cells per axis) z,y,x of the offsets max_pred_moves may visit: within
  ``patch // 2 - fov // 2`` of the centre, cells of ``max(deltas, 1)`` voxels (floor division)."""
  reach = [p // 2 - f // 2 for p, f in zip(patch_zyx, fov_zyx)]
  size = [max(int(d), 1) for d in deltas_zyx]
  lo = [(-r) // c for r, c in zip(reach, size)]
  return lo, tuple(r // c - l + 1 for r, c, l in zip(reach, size, lo))


class _FixedPolicy:
  """google's ``fixed_offsets`` in-graph: each example's moves (centre first) in order, those
  whose voxel in the seed canvas reaches logit(threshold) when they are considered. State: the
  index of each slot's next move to consider."""

  def __init__(self, fov: InGraphFov, moves):
    import tensorflow as tf
    self.moves, self.k, self.b = moves, moves.shape[1], fov.cfg.batch_size
    self.half = tf.constant([s // 2 for s in fov.patch], tf.int32)
    self.threshold = tf.constant(logit(fov.cfg.threshold), tf.float32)

  def _choose(self, seed, ptr, cur):
    import tensorflow as tf
    moves = tf.gather(self.moves, cur)  # [b, k, 3] of each slot's example
    slot = tf.broadcast_to(tf.range(self.b)[:, None, None], [self.b, self.k, 1])
    probe = tf.concat([slot, self.half + moves], axis=-1)  # voxel judged per move
    ok = (tf.range(self.k)[None, :] >= ptr[:, None]) & (tf.gather_nd(seed, probe) >= self.threshold)
    active = tf.reduce_any(ok, axis=1)
    first = tf.argmax(tf.cast(ok, tf.int32), axis=1, output_type=tf.int32)
    return tf.gather(moves, first, batch_dims=1), active, tf.where(active, first + 1, self.k)

  def init(self):
    import tensorflow as tf
    return tf.fill([self.b], self.k)

  def start(self, seed, cur, take, ptr):
    import tensorflow as tf
    off, active, ptr_new = self._choose(seed, tf.where(take, 0, ptr), cur)
    return off, active, tf.where(take, ptr_new, ptr)

  def next(self, seed, off, active, ptr, cur):
    del off, active
    return self._choose(seed, ptr, cur)


class _MaxPredPolicy:
  """google's ``max_pred_offsets`` in-graph (:func:`ffn.training.examples.max_pred_policy`):
  a FIFO queue per slot, from (0,0,0); after each visit the face maxima of the prediction
  around it that reach logit(threshold) join the queue, best score first (ties: larger z,y,x
  offset first); a queued offset is skipped when its FOV would leave the patch or its cell
  ``offset // max(deltas, 1)`` was visited. State: (queue, head, tail, visited cells)."""

  def __init__(self, fov: InGraphFov):
    import tensorflow as tf
    self.b = fov.cfg.batch_size
    self.fov = fov.fov
    self.deltas = tuple(int(d) for d in xyz_to_zyx(fov.trainer.model.deltas))
    self.cell = tf.constant([max(d, 1) for d in self.deltas], tf.int32)
    self.reach = tf.constant([p // 2 - f // 2 for p, f in zip(fov.patch, fov.fov)], tf.int32)
    lo, self.grid = _cells(fov.patch, fov.fov, self.deltas)
    self.cell_lo = tf.constant(lo, tf.int32)
    self.capacity = 1 + 6 * int(np.prod(self.grid))
    self.threshold = tf.constant(logit(fov.cfg.threshold), tf.float32)
    self.half = tf.constant([s // 2 for s in fov.patch], tf.int32)
    self.fov_half = tf.constant([f // 2 for f in fov.fov], tf.int32)

  def init(self):
    import tensorflow as tf
    return (tf.zeros([self.b, self.capacity, 3], tf.int32), tf.zeros([self.b], tf.int32),
            tf.zeros([self.b], tf.int32), tf.zeros((self.b,) + self.grid, tf.bool))

  def start(self, seed, cur, take, state):
    """Slots ``take`` restart with a queue holding (0,0,0) and no visited cell, and pop it."""
    import tensorflow as tf
    del seed, cur
    queue, head, tail, visited = state
    queue = tf.where(take[:, None, None], 0, queue)
    head, tail = tf.where(take, 0, head), tf.where(take, 1, tail)
    visited = tf.where(take[:, None, None, None], False, visited)
    return self._pop(queue, head, tail, visited, take)

  def _pop(self, queue, head, tail, visited, rows):
    """For ``rows``: the first queued offset inside reach and in an unvisited cell."""
    import tensorflow as tf
    slots = tf.range(self.b)

    def cond(found, off, head, visited):
      return tf.reduce_any(~found & (head < tail))

    def body(found, off, head, visited):
      searching = ~found & (head < tail)
      item = tf.gather(queue, tf.minimum(head, self.capacity - 1), batch_dims=1)  # [b, 3]
      inside = tf.reduce_all(tf.abs(item) <= self.reach, axis=1)
      cell = tf.math.floordiv(item, self.cell) - self.cell_lo
      cell = tf.clip_by_value(cell, 0, tf.constant(self.grid, tf.int32) - 1)
      index = tf.concat([slots[:, None], cell], axis=1)
      take = searching & inside & ~tf.gather_nd(visited, index)
      visited = tf.tensor_scatter_nd_update(visited, index, tf.gather_nd(visited, index) | take)
      off = tf.where(take[:, None], item, off)
      return found | take, off, tf.where(searching, head + 1, head), visited

    found, off, head, visited = tf.while_loop(
        cond, body, (~rows, tf.zeros([self.b, 3], tf.int32), head, visited))
    return off, found & rows, (queue, head, tail, visited)

  def _moves(self, seed, off):
    """[b, 6] scores, [b, 6, 3] moves (z,y,x), [b, 6] kept: the face maxima of
    :func:`ffn.inference.movement.scored_move_offsets` over each slot's FOV at ``off``."""
    import tensorflow as tf
    start = self.half + off - self.fov_half
    crops = tf.stack([tf.slice(seed[i], start[i], self.fov) for i in range(self.b)])
    c, d = [f // 2 for f in self.fov], self.deltas
    scores, moves, kept = [], [], []
    for axis in range(3):
      if d[axis] == 0:
        continue
      others = [a for a in range(3) if a != axis]
      for side in (-d[axis], d[axis]):
        sel = [slice(None)] + [slice(c[a] - d[a], c[a] + d[a] + 1) for a in range(3)]
        sel[1 + axis] = c[axis] + side
        face = tf.reshape(crops[tuple(sel)], [self.b, -1])
        pos = tf.argmax(face, axis=1, output_type=tf.int32)
        width = 2 * d[others[1]] + 1
        rel = [None] * 3
        rel[axis] = tf.fill([self.b], side)
        rel[others[0]] = pos // width - d[others[0]]
        rel[others[1]] = pos % width - d[others[1]]
        score = tf.reduce_max(face, axis=1)
        scores.append(score)
        moves.append(tf.stack(rel, axis=1))
        kept.append(score >= self.threshold)
    scores, moves, kept = tf.stack(scores, 1), tf.stack(moves, 1), tf.stack(kept, 1)
    n = scores.shape[1]
    same = (scores[:, :, None] == scores[:, None, :]) & tf.reduce_all(
        moves[:, :, None] == moves[:, None, :], axis=-1)  # [b, i, j]
    earlier = tf.constant(np.tril(np.ones((n, n), bool), -1))  # j < i
    kept = kept & ~tf.reduce_any(same & earlier & kept[:, None, :], axis=2)
    return scores, moves, kept

  def next(self, seed, off, active, state, cur):
    import tensorflow as tf
    del cur
    queue, head, tail, visited = state
    scores, moves, kept = self._moves(seed, off)
    kept = kept & active[:, None]
    # Rank among the kept items, descending by (score, z, y, x): python's sorted(reverse=True).
    si, sj = scores[:, :, None], scores[:, None, :]
    mi, mj = moves[:, :, None], moves[:, None, :]
    tuple_gt = (mj[..., 0] > mi[..., 0]) | ((mj[..., 0] == mi[..., 0]) & (
        (mj[..., 1] > mi[..., 1]) | ((mj[..., 1] == mi[..., 1]) & (mj[..., 2] > mi[..., 2]))))
    before = ((sj > si) | ((sj == si) & tuple_gt)) & kept[:, None, :]  # j sorts before i
    rank = tf.reduce_sum(tf.cast(before, tf.int32), axis=2)
    position = tail[:, None] + rank
    slot = tf.broadcast_to(tf.range(self.b)[:, None], position.shape)
    index = tf.boolean_mask(tf.stack([slot, position], axis=-1), kept)
    queue = tf.tensor_scatter_nd_update(queue, index, tf.boolean_mask(off[:, None, :] + moves, kept))
    tail = tail + tf.reduce_sum(tf.cast(kept, tf.int32), axis=1)
    return self._pop(queue, head, tail, visited, active)


class WorkerInputTrainer:
  """The coordinator's loop for ``--async_input worker`` (see the module docstring)."""

  def __init__(self, trainer, coordinator, num_workers: int, batches_per_call: int = 1,
               in_flight_per_worker: int = 2):
    """``trainer``: a restored :class:`~ffn.training.trainer.Trainer` under the
    ParameterServerStrategy of ``coordinator`` (a ``ClusterCoordinator``); its source attached.
    ``batches_per_call``: batches of examples each scheduled call trains in turn."""
    check_config(trainer.cfg)
    self.trainer, self.coordinator, self.num_workers = trainer, coordinator, num_workers
    self.depth = in_flight_per_worker * num_workers
    source = trainer.source
    self.volumes = WorkerVolumes(source, os.path.join(trainer.cfg.train_dir, CACHE_DIR))
    self.planner = Planner(source, self.volumes, trainer.cfg.batch_size, trainer.model.deltas,
                           trainer.cfg.shuffle_moves)
    self.fov = InGraphFov(trainer, tuple(int(v) for v in source.size_xyz[::-1]), batches_per_call)
    self.per_call = batches_per_call * trainer.cfg.batch_size  # examples
    self.next_index = int(trainer.examples_taken.numpy())  # next stream position to hand out
    self.iterator = iter(coordinator.create_per_worker_dataset(self.volumes.dataset))

  def save(self) -> str:
    """Saves a checkpoint whose ``examples_taken`` is the next stream position to hand out."""
    self.trainer.examples_taken.assign(self.next_index)
    return self.trainer.save()

  def run(self) -> int:
    """Trains to exactly ``max_steps``; 0, or 3 after SIGTERM (checkpoint saved)."""
    import signal
    import tensorflow as tf
    from ffn.training.trainer import EXIT_PREEMPTED, _scalar
    trainer, cfg = self.trainer, self.trainer.cfg
    handlers = {s: signal.signal(s, trainer._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
    writer = tf.summary.create_file_writer(cfg.train_dir)
    step0 = finished = int(trainer.step.numpy())
    _log.info("worker input: %d volume(s) on each worker, stream from example %d, step %d",
              len(self.volumes.names), self.next_index, step0)
    cap = self.fov.max_visits * self.per_call  # each step advances an example by one FOV
    in_flight: collections.deque = collections.deque()
    reserved, losses, steps_logged = 0, [], 0
    t_start = t_log = t_ckpt = time.monotonic()
    status = 0
    try:
      while True:
        while (not trainer._stop and len(in_flight) < self.depth
               and finished + reserved < cfg.max_steps):
          budget = min(cap, cfg.max_steps - finished - reserved)
          args = [tf.constant(v) for v in self.planner.plan(self.next_index, self.per_call).values()]
          self.next_index += self.per_call
          in_flight.append((self.coordinator.schedule(
              self.fov.train_examples, args=(self.iterator, *args, tf.constant(budget, tf.int64))), budget))
          reserved += budget
        if not in_flight:
          break
        remote, budget = in_flight.popleft()
        steps, loss, _ = remote.fetch()
        reserved -= budget
        finished += int(steps)
        steps_logged += int(steps)
        losses.append((float(loss), int(steps)))
        now = time.monotonic()
        if now - t_log >= cfg.summary_rate_secs or steps_logged >= cfg.log_every:
          rate = steps_logged / max(now - t_log, 1e-9)
          mean = sum(l * s for l, s in losses) / max(sum(s for _, s in losses), 1)
          _log.info("step %d/%d loss %.4f  %.2f steps/s (%d workers, worker input)", finished,
                    cfg.max_steps, mean, rate, self.num_workers)
          with writer.as_default(step=finished):
            _scalar("pixel_loss", mean)
            _scalar("steps_per_second", rate)
          writer.flush()
          losses, steps_logged, t_log = [], 0, now
        if trainer._stop:
          continue  # no new calls; the loop ends when the last one is back
        if trainer._save_now or now - t_ckpt >= cfg.checkpoint_interval_s:
          self.save()
          trainer._save_now, t_ckpt = False, now
      self.coordinator.join()
      self.save()
      status = EXIT_PREEMPTED if trainer._stop and finished < cfg.max_steps else 0
      _log.info("coordinator done: step %d, %d examples taken, %.2f steps/s overall",
                int(trainer.step.numpy()), self.next_index,
                (finished - step0) / max(time.monotonic() - t_start, 1e-9))
    finally:
      for s, h in handlers.items():
        signal.signal(s, h)
      writer.close()
    return status

