"""Training data: coordinates + image/label volumes -> a prefetched stream of training examples.

Each example is an (image, soft label) pair of ``fov + 2 * moves * deltas`` voxels (z,y,x) around a
training coordinate (``moves``: :func:`ffn.training.examples.patch_moves`, 1 by default). Per example:

1. the geometric augmentations of :mod:`ffn.training.augment` (rotation, elastic, misalignment)
   resample image and labels from a context ``margin_xy`` voxels larger in y,x (when enabled);
2. the image is normalised ``(raw - offset) / scale`` with its volume's offset and scale (google's
   ``--image_offset_scale_map name:offset:scale,...``; other volumes use ``image_mean`` /
   ``image_stddev``);
3. the object at the centre voxel becomes 0.95, everything else 0.05;
4. missing and out-of-focus sections (image only, sections along the volume's z);
5. one random axis permutation/reflection of both (google's augmentation);
6. brightness / contrast / gamma and Gaussian noise (image only).

``train_coords`` may be several files (comma-separated, globs). Coordinates whose patch does not
fit inside the volume are skipped. Volumes are sampled in proportion to their coordinates (a
per-epoch permutation of all of them), or, with ``volume_weights`` (``name:weight,...``), each
example first picks a volume with probability ``weight / sum(weights)`` and then one of its
coordinates uniformly (with replacement).

The stream is indexed: example ``i`` is fully determined by ``(seed, i)`` (coordinate choice and
every augmentation use per-example RNGs), so a restart that resumes at index ``i`` continues the
same stream.
"""

from __future__ import annotations

import logging
from typing import Iterator, Sequence

import numpy as np

from ffn.axes import BoundingBox
from ffn.errors import FFNError
from ffn.io.volumes import Volume, check_dtype, parse_named_specs
from ffn.training import augment as aug
from ffn.training.examples import augment, example_size_xyz, object_mask, soften_labels

_log = logging.getLogger("ffn.training")

# Volumes smaller than this are read into memory once; larger ones are read patch by patch.
IN_MEMORY_BYTES = 1 << 30


class _Source:
  """A volume read whole (if small) or lazily."""

  def __init__(self, spec, kinds: str):
    self.volume = Volume(spec)
    check_dtype(str(self.volume.spec), self.volume.dtype, kinds)
    self.shape = self.volume.shape
    nbytes = int(np.prod(self.shape)) * np.dtype(self.volume.dtype).itemsize
    self.array = self.volume.read_all() if nbytes <= IN_MEMORY_BYTES else None

  def read(self, box: BoundingBox) -> np.ndarray:
    if self.array is not None:
      return self.array[box.to_slices()]
    return self.volume.read_box(box)


def load_coordinate_files(train_coords: str) -> tuple[np.ndarray, list[str]]:
  """Coordinates of ``train_coords``: one file, a glob (google's flag), or a comma-separated list of
  them (e.g. a ground-truth volume's and a self-training volume's files), concatenated in order."""
  import glob
  from ffn.data.coordinates import load_coordinates
  centers, names = [], []
  for pattern in (p.strip() for p in train_coords.split(",")):
    if not pattern:
      continue
    paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    if not paths:
      raise FFNError(f"--train_coords {pattern!r}: no file matches")
    for path in paths:
      c, n = load_coordinates(path)
      centers.append(c)
      names.extend(n)
  if not centers:
    raise FFNError(f"--train_coords {train_coords!r}: no coordinate file given")
  return np.concatenate(centers), names


def parse_offset_scale_map(text: str | None) -> dict[str, tuple[float, float]]:
  """google's ``--image_offset_scale_map``: ``name:offset:scale,...`` -> {name: (offset, scale)}."""
  out: dict[str, tuple[float, float]] = {}
  for item in (text or "").split(","):
    item = item.strip()
    if not item:
      continue
    parts = item.split(":")
    try:
      if len(parts) != 3:
        raise ValueError
      name, offset, scale = parts[0], float(parts[1]), float(parts[2])
    except ValueError:
      raise FFNError(f"--image_offset_scale_map {item!r}: expected volume_name:offset:scale") from None
    if not name or name in out:
      raise FFNError(f"--image_offset_scale_map {item!r}: volume name empty or given twice")
    if not scale > 0:
      raise FFNError(f"--image_offset_scale_map {item!r}: scale must be positive")
    out[name] = (offset, scale)
  return out


def parse_volume_weights(text: str | None) -> dict[str, float]:
  """``--volume_weights name:weight,...`` -> {name: weight} (weights >= 0, not all 0)."""
  out: dict[str, float] = {}
  for item in (text or "").split(","):
    item = item.strip()
    if not item:
      continue
    name, _, weight = item.rpartition(":")
    try:
      value = float(weight)
    except ValueError:
      value = -1.0
    if not name or name in out or not value >= 0 or not np.isfinite(value):
      raise FFNError(f"--volume_weights {item!r}: expected volume_name:weight (weight >= 0, each "
                     f"name once)")
    out[name] = value
  if out and sum(out.values()) <= 0:
    raise FFNError(f"--volume_weights {text!r}: at least one weight must be positive")
  return out


class ExampleSource:
  """Indexed training examples (see the module docstring)."""

  def __init__(self, train_coords: str, data_volumes: str, label_volumes: str,
               fov_xyz: Sequence[int], deltas_xyz: Sequence[int], image_mean: float | None,
               image_stddev: float | None, permutable_axes: Sequence[int] = (1, 2),
               reflectable_axes: Sequence[int] = (0, 1, 2), seed: int = 0, moves: int = 1,
               image_offset_scale_map: str | None = None, volume_weights: str | None = None,
               augment_config: aug.AugmentConfig | None = None):
    """``fov_xyz``/``deltas_xyz``: the model's FOV and move step (x,y,z, voxels); ``moves``: FOV
    moves of ``deltas`` each way the loaded patch must hold; ``image_offset_scale_map`` and
    ``volume_weights``: see the module docstring; ``augment_config``: None for no augmentation
    beyond permutation/reflection."""
    if image_stddev is not None and image_stddev <= 0:
      raise FFNError(f"--image_stddev must be positive, got {image_stddev}")
    self.size_xyz = example_size_xyz(fov_xyz, deltas_xyz, moves)
    self.permutable_axes, self.reflectable_axes = tuple(permutable_axes), tuple(reflectable_axes)
    self.seed = int(seed)
    self.augment_config = augment_config or aug.AugmentConfig()
    images = {n: _Source(s, "uif") for n, s in parse_named_specs(data_volumes).items()}
    labels = {n: _Source(s, "ui") for n, s in parse_named_specs(label_volumes).items()}
    offset_scale = parse_offset_scale_map(image_offset_scale_map)
    unknown = sorted(set(offset_scale) - set(images))
    if unknown:
      raise FFNError(f"--image_offset_scale_map: volumes {unknown} are not in --data_volumes")
    self.offset_scale: dict[str, tuple[float, float]] = {}
    for name in images:
      if name in offset_scale:
        self.offset_scale[name] = offset_scale[name]
      elif image_mean is None or image_stddev is None:
        raise FFNError(f"volume {name}: no offset and scale (give --image_mean and --image_stddev, "
                       f"or {name}:offset:scale in --image_offset_scale_map)")
      else:
        self.offset_scale[name] = (float(image_mean), float(image_stddev))
    for name, src in images.items():
      if name in labels and labels[name].shape != src.shape:
        raise FFNError(f"volume {name}: image shape {src.shape} and label shape "
                       f"{labels[name].shape} (z,y,x) differ")
    centers, names = load_coordinate_files(train_coords)
    missing = sorted({n for n in names} - (set(images) & set(labels)))
    if missing:
      raise FFNError(f"{train_coords}: volumes {missing} are not in both --data_volumes and "
                     f"--label_volumes")
    # Keep only coordinates whose example box lies inside its volume (google drops the others too).
    starts = centers - self.size_xyz // 2
    keep = np.ones(len(centers), bool)
    for name in set(names):
      rows = np.array([n == name for n in names])
      size = np.array(images[name].shape[::-1])
      keep[rows] &= np.all((starts[rows] >= 0) & (starts[rows] + self.size_xyz <= size), axis=1)
    if not keep.any():
      raise FFNError(f"{train_coords}: no coordinate is at least fov/2 + {moves} x deltas from the "
                     f"volume edge")
    if not keep.all():
      _log.warning("%s: %d of %d coordinates too close to the volume edge, skipped", train_coords,
                   int((~keep).sum()), len(keep))
    self.starts_xyz = starts[keep]
    self.names = [n for n, k in zip(names, keep) if k]
    self.images, self.labels = images, labels
    self._epoch, self._order = -1, np.zeros(0, np.int64)
    self._weighted: tuple[list[np.ndarray], np.ndarray] | None = None
    weights = parse_volume_weights(volume_weights)
    if weights:
      kept = sorted(set(self.names))
      unlisted, unused = sorted(set(kept) - set(weights)), sorted(set(weights) - set(kept))
      if unlisted or unused:
        raise FFNError(f"--volume_weights: " + "; ".join(
            ([f"no weight for volumes {unlisted} of {train_coords}"] if unlisted else [])
            + ([f"volumes {unused} have no usable coordinate in {train_coords}"] if unused else [])))
      rows = [np.flatnonzero(np.array(self.names) == n) for n in kept]
      p = np.array([weights[n] for n in kept], np.float64)
      self._weighted = (rows, p / p.sum())

  def __len__(self) -> int:
    return len(self.names)

  def coordinate(self, index: int) -> int:
    """Row of the (filtered) coordinate table used by stream position ``index``."""
    if self._weighted is not None:
      rows, p = self._weighted
      rng = np.random.default_rng([self.seed, 4, int(index)])
      volume_rows = rows[int(rng.choice(len(rows), p=p))]
      return int(volume_rows[rng.integers(len(volume_rows))])
    epoch, pos = divmod(int(index), len(self))
    if epoch != self._epoch:
      self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self))
      self._epoch = epoch
    return int(self._order[pos])

  def example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(normalised image float32, soft labels float32), both z,y,x of the example size."""
    row = self.coordinate(index)
    name = self.names[row]
    cfg = self.augment_config
    aug_rng = np.random.default_rng([self.seed, 3, int(index)])
    box = BoundingBox(self.starts_xyz[row], self.size_xyz)
    if cfg.geometric:
      size_zyx = tuple(int(v) for v in self.size_xyz[::-1])
      margin = np.array([cfg.margin_xy(size_zyx)] * 2 + [0])  # x,y,z
      lo = np.maximum(box.start - margin, 0)
      hi = np.minimum(box.end + margin, np.array(self.images[name].shape[::-1]))
      context = BoundingBox(lo, hi - lo)
      image, labels = aug.geometric(aug_rng, cfg, self.images[name].read(context),
                                    self.labels[name].read(context), (box.start - lo)[::-1],
                                    size_zyx)
    else:
      image = self.images[name].read(box).astype(np.float32)
      labels = self.labels[name].read(box)
    offset, scale = self.offset_scale[name]
    image = (image - offset) / scale
    labels = soften_labels(object_mask(labels))
    image = aug.sections(aug_rng, cfg, image)
    rng = np.random.default_rng([self.seed, 1, int(index)])
    image, labels = augment(rng, [image, labels], self.permutable_axes, self.reflectable_axes)
    return aug.photometric(aug_rng, cfg, image), labels

  def stream(self, start: int, prefetch: int = 16, worker: int = 0, num_workers: int = 1):
    """A prefetching ``tf.data`` iterator of (image, labels) from stream position ``start``.

    With ``num_workers`` > 1 this worker's position ``i`` is example ``i * num_workers + worker``:
    the workers read disjoint interleaved parts of one stream.
    """
    import tensorflow as tf
    shape = tuple(int(v) for v in self.size_xyz[::-1])

    def generate() -> Iterator[tuple[np.ndarray, np.ndarray]]:
      index = start
      while True:
        yield self.example(index * num_workers + worker)
        index += 1

    spec = (tf.TensorSpec(shape, tf.float32), tf.TensorSpec(shape, tf.float32))
    ds = tf.data.Dataset.from_generator(generate, output_signature=spec).prefetch(prefetch)
    return iter(ds)
