"""Random training crops from the volumes of one domain, deterministic by index, read lazily.

Crop ``i`` of a domain is drawn from ``np.random.default_rng([seed, domain, i])``: a volume
(with probability proportional to its number of possible crop corners), a corner, a permutation
of the ``permutable_axes`` (of z,y,x = 0,1,2) and a flip of each of the ``reflectable_axes``.
Only the crop is read (:class:`ffn.io.volumes.Volume`). Step ``s`` of a run with batch ``b``
takes crops ``s*b .. s*b + b - 1`` of each domain, so a resumed run reads the same crops.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ffn.axes import BoundingBox, zyx_to_xyz
from ffn.errors import FFNError
from ffn.io.volumes import Volume
from secgan.normalization import check_volume_dtype, to_unit


class CropSource:
  """Crops of ``shape_zyx`` from ``specs`` (one domain). ``domain``: 0 labeled, 1 unlabeled."""

  def __init__(self, specs: Sequence[str], shape_zyx: Sequence[int], domain: int, seed: int = 0,
               permutable_axes: Sequence[int] = (1, 2), reflectable_axes: Sequence[int] = (0, 1, 2)):
    self.shape_zyx = tuple(int(s) for s in shape_zyx)
    self.domain, self.seed = int(domain), int(seed)
    self.permutable = tuple(permutable_axes)
    self.reflectable = tuple(reflectable_axes)
    if len(set(self.shape_zyx[a] for a in self.permutable)) > 1:
      raise FFNError(f"--fov_size: the permutable axes {list(self.permutable)} (z,y,x) need equal "
                     f"sizes, got {list(self.shape_zyx)}")
    self.volumes = [Volume(s) for s in specs]
    self.corners: list[np.ndarray] = []
    for vol in self.volumes:
      check_volume_dtype(str(vol.spec), vol.dtype)
      room = np.array(vol.shape) - np.array(self.shape_zyx) + 1
      if np.any(room < 1):
        raise FFNError(f"{vol.spec}: volume of size {list(zyx_to_xyz(vol.shape))} (x,y,z) is "
                       f"smaller than a training crop of {list(zyx_to_xyz(self.shape_zyx))} "
                       f"(--fov_size plus 4 x 2 x generator_depth)")
      self.corners.append(room)
    weights = np.array([float(np.prod(r)) for r in self.corners])
    self.p = weights / weights.sum()

  def crop(self, index: int) -> np.ndarray:
    """Crop ``index``: float32 unit space [z, y, x] (:mod:`secgan.normalization`)."""
    rng = np.random.default_rng([self.seed, self.domain, int(index)])
    v = int(rng.choice(len(self.volumes), p=self.p))
    corner = [int(rng.integers(0, n)) for n in self.corners[v]]
    box = BoundingBox(zyx_to_xyz(corner), zyx_to_xyz(self.shape_zyx))
    data = to_unit(self.volumes[v].read_box(box))
    axes = list(range(3))
    perm = list(rng.permutation(self.permutable))
    for a, b in zip(self.permutable, perm):
      axes[a] = int(b)
    data = np.transpose(data, axes)
    flips = [a for a in self.reflectable if rng.integers(0, 2)]
    if flips:
      data = np.flip(data, axis=flips)
    return np.ascontiguousarray(data)

  def batch(self, step: int, batch_size: int) -> np.ndarray:
    """Crops ``step * batch_size ...`` stacked: [b, z, y, x, 1]."""
    first = int(step) * int(batch_size)
    return np.stack([self.crop(first + i) for i in range(batch_size)])[..., None]

  def close(self) -> None:
    for vol in self.volumes:
      vol.close()
