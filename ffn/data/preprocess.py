"""Image preprocessing before training or inference (``ffn preprocess``).

``--clahe``: contrast-limited adaptive histogram equalisation of every z section (2D, as the
SNEMI3D-based FFN tutorials do), with scikit-image's ``exposure.equalize_adapthist``: tiles of
``--clahe_kernel_size`` pixels (x,y; default 1/8 of the section's width and height),
``--clahe_nbins`` histogram bins and ``--clahe_clip_limit`` (a fraction of the tile's voxels, 0..1;
higher = more contrast). The result, in [0, 1], is stored as uint8 ``rint(255 * value)``.

The input is any volume spec (slice stack, multi-page TIFF, HDF5) of unsigned integers; the output
an HDF5 dataset written slab by slab to a temporary file and renamed. Use the output (and
``ffn stats`` of it) for training and for inference alike: a model trained on equalised images
expects equalised input.
"""

from __future__ import annotations

import argparse
import logging

import h5py
import numpy as np

from ffn.errors import FFNError
from ffn.io.atomic import atomic_path
from ffn.io.volumes import Volume, check_dtype, parse_spec
from ffn.progress import Progress

_log = logging.getLogger(__name__)


def clahe_section(section: np.ndarray, kernel_size_xy: tuple[int, int] | None = None,
                  clip_limit: float = 0.01, nbins: int = 256) -> np.ndarray:
  """CLAHE of one y,x section (unsigned integers) -> uint8 (see the module docstring)."""
  from skimage import exposure
  kernel = None if kernel_size_xy is None else (int(kernel_size_xy[1]), int(kernel_size_xy[0]))
  out = exposure.equalize_adapthist(section, kernel_size=kernel, clip_limit=clip_limit,
                                    nbins=nbins)
  return np.rint(out * 255).astype(np.uint8)


def preprocess(input_spec: str, output_spec: str, kernel_size_xy: tuple[int, int] | None = None,
               clip_limit: float = 0.01, nbins: int = 256, slab_z: int = 16) -> tuple[int, ...]:
  """Writes the CLAHE of every section of ``input_spec`` to the HDF5 ``output_spec`` (uint8).
  Returns the shape (z, y, x)."""
  out = parse_spec(output_spec)
  if out.dataset is None:
    raise FFNError(f"{output_spec}: output must be an HDF5 spec path.h5:dataset")
  if not 0 <= clip_limit <= 1:
    raise FFNError(f"--clahe_clip_limit must be in [0, 1], got {clip_limit}")
  if nbins < 2:
    raise FFNError(f"--clahe_nbins must be >= 2, got {nbins}")
  if kernel_size_xy is not None and min(kernel_size_xy) < 2:
    raise FFNError(f"--clahe_kernel_size must be >= 2 pixels, got {kernel_size_xy}")
  with Volume(input_spec) as vol:
    check_dtype(str(vol.spec), vol.dtype, "u")
    shape = vol.shape
    with atomic_path(out.path, suffix=".h5") as tmp:
      with h5py.File(tmp, "w") as f:
        ds = f.create_dataset(out.dataset, shape=shape, dtype=np.uint8, compression="gzip",
                              chunks=(min(64, shape[0]), min(64, shape[1]), min(64, shape[2])))
        with Progress(shape[0], f"clahe {vol.spec}", unit="slices") as progress:
          for z0 in range(0, shape[0], slab_z):
            z1 = min(z0 + slab_z, shape[0])
            slab = vol[z0:z1]
            ds[z0:z1] = np.stack([clahe_section(s, kernel_size_xy, clip_limit, nbins) for s in slab])
            progress.update(z1 - z0)
  _log.info("wrote %s %s uint8", output_spec, shape)
  return shape


def _kernel(text: str) -> tuple[int, int]:
  parts = [int(p) for p in text.split(",")]
  if len(parts) == 1:
    parts = parts * 2
  if len(parts) != 2:
    raise argparse.ArgumentTypeError(f"expected N or X,Y pixels, got {text!r}")
  return parts[0], parts[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--input", required=True,
                      help="image volume: PNG/TIFF slice directory or glob, multi-page TIFF, path.h5:dataset")
  parser.add_argument("--output", required=True, help="output HDF5 spec path.h5:dataset (uint8)")
  parser.add_argument("--clahe", action="store_true", required=True,
                      help="contrast-limited adaptive histogram equalisation of each z section")
  parser.add_argument("--clahe_kernel_size", type=_kernel, default=None,
                      help="tile size N or X,Y in pixels (default: 1/8 of the section)")
  parser.add_argument("--clahe_clip_limit", type=float, default=0.01,
                      help="clip limit, fraction of a tile's pixels per bin (0..1)")
  parser.add_argument("--clahe_nbins", type=int, default=256, help="histogram bins")


def run(args: argparse.Namespace) -> int:
  shape = preprocess(args.input, args.output, args.clahe_kernel_size, args.clahe_clip_limit,
                     args.clahe_nbins)
  print(f"{args.output}: shape (z,y,x) {shape}, dtype uint8 (CLAHE of each section)")
  return 0
