"""Training data: coordinates + image/label volumes -> a prefetched stream of training examples.

Each example is an (image, soft label) pair of ``fov + 2 * moves * deltas`` voxels (z,y,x) around a
training coordinate (``moves``: :func:`ffn.training.examples.patch_moves`, 1 by default): the object
at the centre becomes 0.95, everything else 0.05; the image is normalised
``(raw - image_mean) / image_stddev``; one random axis permutation/reflection is applied to both.
Coordinates whose patch does not fit inside the volume are skipped.

The stream is indexed: example ``i`` is fully determined by ``(seed, i)`` (coordinate order is a
per-epoch permutation, augmentation a per-example RNG), so a restart that resumes at index ``i``
continues the same stream.
"""

from __future__ import annotations

import logging
from typing import Iterator, Sequence

import numpy as np

from ffn.axes import BoundingBox
from ffn.errors import FFNError
from ffn.io.volumes import Volume, check_dtype, parse_named_specs
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


class ExampleSource:
  """Indexed training examples (see the module docstring)."""

  def __init__(self, train_coords: str, data_volumes: str, label_volumes: str,
               fov_xyz: Sequence[int], deltas_xyz: Sequence[int], image_mean: float,
               image_stddev: float, permutable_axes: Sequence[int] = (1, 2),
               reflectable_axes: Sequence[int] = (0, 1, 2), seed: int = 0, moves: int = 1):
    """``fov_xyz``/``deltas_xyz``: the model's FOV and move step (x,y,z, voxels); ``moves``: FOV
    moves of ``deltas`` each way the loaded patch must hold."""
    from ffn.data.coordinates import load_coordinates
    if image_stddev <= 0:
      raise FFNError(f"--image_stddev must be positive, got {image_stddev}")
    self.size_xyz = example_size_xyz(fov_xyz, deltas_xyz, moves)
    self.image_mean, self.image_stddev = float(image_mean), float(image_stddev)
    self.permutable_axes, self.reflectable_axes = tuple(permutable_axes), tuple(reflectable_axes)
    self.seed = int(seed)
    images = {n: _Source(s, "uif") for n, s in parse_named_specs(data_volumes).items()}
    labels = {n: _Source(s, "ui") for n, s in parse_named_specs(label_volumes).items()}
    for name, src in images.items():
      if name in labels and labels[name].shape != src.shape:
        raise FFNError(f"volume {name}: image shape {src.shape} and label shape "
                       f"{labels[name].shape} (z,y,x) differ")
    centers, names = load_coordinates(train_coords)
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

  def __len__(self) -> int:
    return len(self.names)

  def coordinate(self, index: int) -> int:
    """Row of the (filtered) coordinate table used by stream position ``index``."""
    epoch, pos = divmod(int(index), len(self))
    if epoch != self._epoch:
      self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self))
      self._epoch = epoch
    return int(self._order[pos])

  def example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(normalised image float32, soft labels float32), both z,y,x of the example size."""
    row = self.coordinate(index)
    name = self.names[row]
    box = BoundingBox(self.starts_xyz[row], self.size_xyz)
    image = self.images[name].read(box).astype(np.float32)
    labels = soften_labels(object_mask(self.labels[name].read(box)))
    rng = np.random.default_rng([self.seed, 1, int(index)])
    image, labels = augment(rng, [image, labels], self.permutable_axes, self.reflectable_axes)
    return (image - self.image_mean) / self.image_stddev, labels

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
