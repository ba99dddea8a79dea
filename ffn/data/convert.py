"""Image stack -> HDF5 conversion (``ffn convert``).

Reads a PNG/TIFF slice stack (or any volume spec) slab by slab and writes an HDF5 dataset, so the
whole volume is never held in memory. ``--kind image`` stores raw EM as uint8; ``--kind labels``
stores a segmentation (any integer type, e.g. 16-bit PNGs or TIFFs) as int64 (the dtype
google/ffn's training and evaluation expect); ``--kind mask`` turns a binary mask stack into
instance labels by connected components (:mod:`ffn.data.masks`; read whole).
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

OUTPUT_DTYPES = {"image": np.uint8, "labels": np.int64}
# Allowed input dtype kinds: images must already be 8-bit; labels any integer type.
INPUT_KINDS = {"image": "u", "labels": "ui"}


def convert_volume(input_spec: str, output_spec: str, kind: str, slab_z: int = 32) -> tuple[int, ...]:
  """Copies ``input_spec`` into the HDF5 dataset ``output_spec`` as uint8 (image) or int64 (labels).

  Returns the written shape (z, y, x). The output file is written to a temporary name and renamed
  at the end, so an interrupted conversion leaves no partial file.
  """
  if kind not in OUTPUT_DTYPES:
    raise FFNError(f"--kind must be one of {sorted(OUTPUT_DTYPES)}, got {kind!r}")
  out = parse_spec(output_spec)
  if out.dataset is None:
    raise FFNError(f"{output_spec}: output must be an HDF5 spec path.h5:dataset")
  out_dtype = OUTPUT_DTYPES[kind]
  with Volume(input_spec) as vol:
    check_dtype(str(vol.spec), vol.dtype, INPUT_KINDS[kind])
    if kind == "image" and vol.dtype != np.uint8:
      raise FFNError(f"{vol.spec}: image dtype {vol.dtype} is not 8-bit; rescale it to uint8 first")
    shape = vol.shape
    chunks = (min(64, shape[0]), min(64, shape[1]), min(64, shape[2]))
    with atomic_path(out.path, suffix=".h5") as tmp:
      with h5py.File(tmp, "w") as f:
        ds = f.create_dataset(out.dataset, shape=shape, dtype=out_dtype, chunks=chunks,
                              compression="gzip")
        with Progress(shape[0], f"convert {vol.spec}", unit="slices") as progress:
          for z0 in range(0, shape[0], slab_z):
            z1 = min(z0 + slab_z, shape[0])
            slab = vol[z0:z1]
            if kind == "labels" and slab.dtype.kind == "u" and slab.dtype.itemsize == 8 \
                and slab.size and slab.max() > np.iinfo(np.int64).max:
              raise FFNError(f"{vol.spec}: label ids above 2^63-1 cannot be stored as int64")
            ds[z0:z1] = slab.astype(out_dtype, copy=False)
            progress.update(z1 - z0)
  _log.info("wrote %s %s %s", output_spec, shape, np.dtype(out_dtype).name)
  return shape


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--input", required=True,
                      help="input volume: a directory or glob of PNG/TIFF slices (one per z, natural "
                           "name order), a multi-page TIFF, or path.h5:dataset")
  parser.add_argument("--output", required=True, help="output HDF5 spec, path.h5:dataset")
  parser.add_argument("--kind", choices=sorted(OUTPUT_DTYPES) + ["mask"], default="image",
                      help="image -> uint8 raw EM; labels -> int64 segmentation; mask -> int64 "
                           "instances of a binary mask (connected components)")
  mask = parser.add_argument_group("--kind mask")
  mask.add_argument("--invert", action="store_true",
                    help="objects are the dark voxels (value <= --threshold), e.g. black on white")
  mask.add_argument("--threshold", type=float, default=0,
                    help="foreground: value > threshold (default 0: any non-zero value)")
  mask.add_argument("--connectivity", type=int, choices=(6, 18, 26), default=6,
                    help="3D neighbours that connect an object: faces (6), +edges (18), +corners (26)")
  mask.add_argument("--min_size", type=int, default=0,
                    help="objects of fewer voxels become background 0")


def run(args: argparse.Namespace) -> int:
  if args.kind == "mask":
    from ffn.data.masks import convert_mask
    shape, count = convert_mask(args.input, args.output, args.invert, args.threshold,
                                args.connectivity, args.min_size)
    print(f"{args.output}: shape (z,y,x) {shape}, dtype int64, {count} objects")
    return 0
  shape = convert_volume(args.input, args.output, args.kind)
  print(f"{args.output}: shape (z,y,x) {shape}, dtype {np.dtype(OUTPUT_DTYPES[args.kind]).name}")
  return 0
