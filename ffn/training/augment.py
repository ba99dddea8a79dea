"""EM-specific training augmentations: pure functions on z,y,x (image, labels) patches.

Real EM has rotated, warped, misaligned, missing and out-of-focus sections and varying contrast;
these simulate them on each training example (in addition to google's axis permutation and
reflection, :func:`ffn.training.examples.augment`). Every function takes its random draws from a
``numpy.random.Generator`` it is given, so an example is a pure function of its seed.

Geometric augmentations (image and labels together, one resampling pass, :func:`warp`):

* **rotation** about the z axis through the patch centre voxel by an angle uniform in
  ``[-rotation_max_deg, rotation_max_deg]``; the image is resampled bilinearly in y,x (source
  positions keep their section), the labels by nearest neighbour;
* **elastic deformation**: an in-plane (y,x) displacement field, white noise smoothed by a 3D
  Gaussian of standard deviation ``elastic_sigma`` voxels (:func:`elastic_field`) and scaled so
  its largest component is ``elastic_alpha`` voxels (``alpha`` is the largest displacement;
  larger ``sigma`` = smoother);
* **misalignment**: with probability ``misalign_prob`` per example a run of consecutive sections
  (start uniform in 1..z-1, length uniform to the end) is shifted in y and x by integers uniform in
  ``[-misalign_max_shift, misalign_max_shift]`` voxels.

Source positions outside the patch read a context of ``margin_xy`` extra voxels each side in y,x
(:meth:`AugmentConfig.margin_xy`), so rotated corners show real data; beyond the volume the context
is mirrored. The training seed stays at the patch centre: the object mask is taken from the
centre voxel of the warped labels (:mod:`ffn.training.data`), so a run that shifts the centre
section trains on whichever object the shift brought there, as in a misaligned volume.

Image-only augmentations, in this order, on the normalised image:

* **missing sections**: each section with probability ``missing_section_prob`` is blanked (0, the
  image mean) or replaced by its neighbour (z-1, or z+1 for the first), half each;
* **out-of-focus sections**: each section with probability ``blur_section_prob`` is blurred in y,x
  by a Gaussian of standard deviation uniform in ``(0, blur_max_sigma]`` voxels;
* **brightness / contrast / gamma**: ``x * c + b`` with ``c`` uniform in ``[1 - contrast,
  1 + contrast]`` and ``b`` uniform in ``[-brightness, brightness]`` (units of the image standard
  deviation), then gamma ``2**u``, ``u`` uniform in ``[-gamma, gamma]``, over the patch's own
  intensity range (its minimum and maximum stay);
* **Gaussian noise** of standard deviation uniform in ``[0, noise_stddev]`` (image stddev units).

Every augmentation at strength 0 (the default) draws nothing and returns its input unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import ndimage

from ffn.errors import FFNError


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Strengths of the augmentations (see the module docstring); all 0 = none. Voxels, degrees,
  probabilities in [0, 1], and image-stddev units for brightness and noise."""
  rotation_max_deg: float = 0.0
  elastic_alpha: float = 0.0
  elastic_sigma: float = 4.0
  misalign_prob: float = 0.0
  misalign_max_shift: int = 0
  missing_section_prob: float = 0.0
  blur_section_prob: float = 0.0
  blur_max_sigma: float = 2.0
  brightness: float = 0.0
  contrast: float = 0.0
  gamma: float = 0.0
  noise_stddev: float = 0.0

  def __post_init__(self) -> None:
    for name in ("misalign_prob", "missing_section_prob", "blur_section_prob"):
      value = getattr(self, name)
      if not 0.0 <= value <= 1.0:
        raise FFNError(f"--{name} must be a probability in [0, 1], got {value}")
    for name in ("rotation_max_deg", "elastic_alpha", "misalign_max_shift", "brightness",
                 "contrast", "gamma", "noise_stddev"):
      if getattr(self, name) < 0:
        raise FFNError(f"--{name} must be >= 0, got {getattr(self, name)}")
    for name in ("elastic_sigma", "blur_max_sigma"):
      if getattr(self, name) <= 0:
        raise FFNError(f"--{name} must be > 0 voxels, got {getattr(self, name)}")
    if self.contrast >= 1:
      raise FFNError(f"--contrast must be < 1 (the factor is 1 +/- contrast), got {self.contrast}")

  @property
  def geometric(self) -> bool:
    """Whether any augmentation moves voxels (image and labels resampled by :func:`warp`)."""
    return (self.rotation_max_deg > 0 or self.elastic_alpha > 0
            or (self.misalign_prob > 0 and self.misalign_max_shift > 0))

  def margin_xy(self, size_zyx: Sequence[int]) -> int:
    """Context voxels needed each side in y and x around a patch of ``size_zyx`` so that every
    source position of :func:`warp` lies inside it."""
    if not self.geometric:
      return 0
    margin = 0.0
    if self.rotation_max_deg > 0:
      hy, hx = size_zyx[1] // 2, size_zyx[2] // 2
      margin += math.hypot(hy, hx) - min(hy, hx)
    if self.elastic_alpha > 0:
      margin += self.elastic_alpha
    if self.misalign_prob > 0:
      margin += self.misalign_max_shift
    return int(math.ceil(margin))


def rotation_angle(rng: np.random.Generator, max_deg: float) -> float:
  """Rotation about z in radians, uniform in [-max_deg, max_deg] degrees (0 draws nothing)."""
  return math.radians(rng.uniform(-max_deg, max_deg)) if max_deg > 0 else 0.0


def elastic_field(rng: np.random.Generator, shape_zyx: Sequence[int], alpha: float,
                  sigma: float) -> np.ndarray | None:
  """In-plane displacement field [2 (dy, dx), z, y, x] in voxels, float32; None when ``alpha`` is 0.

  White noise on a grid every ``step = max(1, floor(sigma / 2))`` voxels along z, y and x, smoothed
  by a Gaussian of ``sigma`` voxels (``sigma / step`` grid steps), interpolated linearly to every
  voxel and scaled so that the largest |component| is ``alpha`` voxels. (The coarse grid makes it
  ~100x cheaper than smoothing per-voxel noise; with ``step <= sigma / 2`` the interpolation
  leaves the field as smooth.)
  """
  if alpha <= 0:
    return None
  step = max(1, int(sigma // 2))
  coarse = [(int(n) - 1) // step + 2 for n in shape_zyx]
  field = rng.standard_normal([2] + coarse)
  for c in range(2):
    field[c] = ndimage.gaussian_filter(field[c], sigma / step, mode="reflect", truncate=3.0)
  field = field.astype(np.float32)
  for axis, n in enumerate(shape_zyx):  # linear interpolation, one axis at a time
    pos = np.arange(int(n)) / step
    lo = np.floor(pos).astype(np.int64)
    frac = (pos - lo).astype(np.float32).reshape([-1 if a == axis + 1 else 1 for a in range(4)])
    field = (1 - frac) * field.take(lo, axis=axis + 1) + frac * field.take(lo + 1, axis=axis + 1)
  peak = float(np.abs(field).max())
  return field * np.float32(alpha / peak if peak > 0 else 0.0)


def misalignment_shifts(rng: np.random.Generator, depth: int, prob: float,
                        max_shift: int) -> np.ndarray | None:
  """Per-section integer shifts [z, 2 (dy, dx)] in voxels: zero except one run of consecutive
  sections (start uniform in 1..depth-1, length uniform up to the last section) shifted by one
  (dy, dx) uniform in [-max_shift, max_shift]; None when nothing is shifted."""
  if prob <= 0 or max_shift <= 0 or depth < 2 or rng.random() >= prob:
    return None
  start = int(rng.integers(1, depth))
  length = int(rng.integers(1, depth - start + 1))
  shifts = np.zeros((depth, 2), np.int64)
  shifts[start:start + length] = rng.integers(-max_shift, max_shift + 1, size=2)
  return shifts


def warp(image: np.ndarray, labels: np.ndarray, start_zyx: Sequence[int], size_zyx: Sequence[int],
         angle: float = 0.0, field: np.ndarray | None = None,
         shifts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Resamples a ``size_zyx`` patch out of a larger context (image float, labels integer).

  ``start_zyx``: the patch's first voxel in context coordinates (z,y,x). Output voxel ``q`` (patch
  coordinates, centre ``c = size // 2``) reads section ``start_z + q_z`` of the context at (y, x)
  ``start + c + R(-angle) (q - c) + field[:, q] - shifts[q_z]``: the content turns by ``angle``
  (radians, counter-clockwise from +x towards +y), moves with the displacement field, and the
  sections of a run move by ``shifts``. The image is interpolated bilinearly (float32 weights),
  the labels take the nearest voxel (halves round up); positions outside the context are mirrored
  about its edge voxels (scipy's "mirror"). Returns (float32 image, labels of the input dtype).
  """
  nz, ny, nx = (int(s) for s in size_zyx)
  cy, cx = ny // 2, nx // 2
  y = np.arange(ny, dtype=np.float64)[:, None] - cy
  x = np.arange(nx, dtype=np.float64)[None, :] - cx
  # Exact values at multiples of 90 degrees (cos(pi/2) is 6e-17, not 0).
  cos, sin = round(math.cos(angle), 15), round(math.sin(angle), 15)
  src_y = np.broadcast_to(cos * y - sin * x + cy + start_zyx[1], (nz, ny, nx))
  src_x = np.broadcast_to(sin * y + cos * x + cx + start_zyx[2], (nz, ny, nx))
  if field is not None:
    src_y, src_x = src_y + field[0], src_x + field[1]
  if shifts is not None:
    src_y = src_y - shifts[:, 0, None, None]
    src_x = src_x - shifts[:, 1, None, None]
  cz, cyy, cxx = image.shape
  plane = (np.arange(nz, dtype=np.int64) + int(start_zyx[0]))[:, None, None] * (cyy * cxx)
  flat_image = image.reshape(-1).astype(np.float32, copy=False)
  y0, x0 = np.floor(src_y), np.floor(src_x)
  fy, fx = (src_y - y0).astype(np.float32), (src_x - x0).astype(np.float32)
  y0, x0 = y0.astype(np.int64), x0.astype(np.int64)
  if y0.min() >= 0 and y0.max() < cyy - 1 and x0.min() >= 0 and x0.max() < cxx - 1:
    # Every neighbour inside the context (the usual case: margin_xy covers the warp).
    i00 = plane + y0 * cxx + x0
    corners = (i00, i00 + 1, i00 + cxx, i00 + (cxx + 1))
  else:
    rows = (_mirror(y0, cyy) * cxx, _mirror(y0 + 1, cyy) * cxx)
    cols = (_mirror(x0, cxx), _mirror(x0 + 1, cxx))
    corners = (plane + rows[0] + cols[0], plane + rows[0] + cols[1], plane + rows[1] + cols[0],
               plane + rows[1] + cols[1])
  v00, v01, v10, v11 = (flat_image.take(i) for i in corners)
  out_image = _lerp(_lerp(v00, v01, fx), _lerp(v10, v11, fx), fy)
  # Nearest voxel: the upper neighbour where the fraction is at least one half.
  up_y, up_x = fy >= 0.5, fx >= 0.5
  near = np.where(up_y, np.where(up_x, corners[3], corners[2]), np.where(up_x, corners[1], corners[0]))
  return out_image, labels.reshape(-1).take(near)


def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
  """``a + t (b - a)`` in float32 (exact at t = 0 and, for equal a and b, everywhere)."""
  return a + t * (b - a)


def _mirror(index: np.ndarray, n: int) -> np.ndarray:
  """Integer voxel indices reflected about the edge voxels of 0..n-1 (scipy's "mirror" mode)."""
  if n == 1:
    return np.zeros_like(index)
  if index.min() >= 0 and index.max() < n:
    return index
  period = 2 * (n - 1)
  i = np.mod(index, period)
  return np.where(i >= n, period - i, i)


def missing_sections(rng: np.random.Generator, image: np.ndarray, prob: float) -> np.ndarray:
  """Each z section with probability ``prob`` becomes 0 (blank) or a copy of its neighbour (z-1,
  z+1 for the first section), half each. Returns a new array (the input when ``prob`` is 0)."""
  if prob <= 0:
    return image
  hit = rng.random(image.shape[0]) < prob
  blank = rng.random(image.shape[0]) < 0.5
  if not hit.any():
    return image
  out = image.copy()
  for z in np.flatnonzero(hit):
    if blank[z] or image.shape[0] == 1:
      out[z] = 0
    else:
      out[z] = image[z - 1] if z > 0 else image[1]
  return out


def blur_sections(rng: np.random.Generator, image: np.ndarray, prob: float,
                  max_sigma: float) -> np.ndarray:
  """Each z section with probability ``prob`` is blurred in y,x by a Gaussian of standard
  deviation uniform in (0, max_sigma] voxels (out of focus). The input when ``prob`` is 0."""
  if prob <= 0:
    return image
  hit = rng.random(image.shape[0]) < prob
  sigmas = max_sigma * (1.0 - rng.random(image.shape[0]))  # (0, max_sigma]
  if not hit.any():
    return image
  out = image.copy()
  for z in np.flatnonzero(hit):
    out[z] = ndimage.gaussian_filter(image[z], float(sigmas[z]), mode="reflect", truncate=3.0)
  return out


def intensity(rng: np.random.Generator, image: np.ndarray, brightness: float, contrast: float,
              gamma: float) -> np.ndarray:
  """``image * c + b``, then gamma over the patch range (see the module docstring). float32."""
  out = image
  if contrast > 0 or brightness > 0:
    c = rng.uniform(1 - contrast, 1 + contrast) if contrast > 0 else 1.0
    b = rng.uniform(-brightness, brightness) if brightness > 0 else 0.0
    out = (out * np.float32(c) + np.float32(b)).astype(np.float32)
  if gamma > 0:
    g = 2.0 ** rng.uniform(-gamma, gamma)
    lo, hi = float(out.min()), float(out.max())
    if hi > lo:
      u = (out - np.float32(lo)) / np.float32(hi - lo)
      out = (np.float32(lo) + np.float32(hi - lo) * np.power(u, np.float32(g))).astype(np.float32)
  return out


def gaussian_noise(rng: np.random.Generator, image: np.ndarray, max_stddev: float) -> np.ndarray:
  """Adds Gaussian noise of standard deviation uniform in [0, max_stddev]. float32."""
  if max_stddev <= 0:
    return image
  stddev = rng.uniform(0.0, max_stddev)
  noise = rng.standard_normal(image.shape, dtype=np.float32)
  return (image + np.float32(stddev) * noise).astype(np.float32)


def geometric(rng: np.random.Generator, cfg: AugmentConfig, image: np.ndarray, labels: np.ndarray,
              start_zyx: Sequence[int], size_zyx: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """Draws rotation, elastic field and misalignment and applies them with one :func:`warp`."""
  angle = rotation_angle(rng, cfg.rotation_max_deg)
  field = elastic_field(rng, size_zyx, cfg.elastic_alpha, cfg.elastic_sigma)
  shifts = misalignment_shifts(rng, int(size_zyx[0]), cfg.misalign_prob, cfg.misalign_max_shift)
  return warp(image, labels, start_zyx, size_zyx, angle, field, shifts)


def sections(rng: np.random.Generator, cfg: AugmentConfig, image: np.ndarray) -> np.ndarray:
  """Missing and out-of-focus sections (z is the volume's section axis: before any permutation)."""
  image = missing_sections(rng, image, cfg.missing_section_prob)
  return blur_sections(rng, image, cfg.blur_section_prob, cfg.blur_max_sigma)


def photometric(rng: np.random.Generator, cfg: AugmentConfig, image: np.ndarray) -> np.ndarray:
  """Brightness / contrast / gamma, then Gaussian noise."""
  image = intensity(rng, image, cfg.brightness, cfg.contrast, cfg.gamma)
  return gaussian_noise(rng, image, cfg.noise_stddev)
