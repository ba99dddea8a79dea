"""Superpixel ground truth + ``transforms`` table -> body labels (``ffn apply_transforms``).

NeuroProof-style ground truth (e.g. FlyEM's ``groundtruth.h5``) stores ``stack`` as per-slice
*superpixel* ids and a ``transforms`` dataset of (superpixel, body) rows. Training or scoring on the
raw ``stack`` would use 2D fragments instead of neurons; the body labels are ``transforms`` applied
to ``stack``. Superpixel 0 (boundary) maps to body 0 unless the table says otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os

import h5py
import numpy as np

from ffn.errors import FFNError
from ffn.io.atomic import atomic_path
from ffn.io.volumes import Volume, check_dtype, parse_spec
from ffn.progress import Progress

_log = logging.getLogger(__name__)

UNMAPPED_POLICIES = ("keep", "zero", "error")


def validate_transforms(table: np.ndarray, where: str) -> np.ndarray:
  """Checks a (superpixel, body) table and returns it as int64 [N, 2], sorted by superpixel.

  A superpixel listed twice with different bodies is an error; exact duplicate rows are allowed.
  """
  table = np.asarray(table)
  if table.ndim != 2 or table.shape[1] != 2:
    raise FFNError(f"{where}: transforms must have shape [N, 2] (superpixel, body), got {table.shape}")
  if table.dtype.kind not in "ui":
    raise FFNError(f"{where}: transforms dtype {table.dtype} is not integer")
  table = np.unique(table.astype(np.int64), axis=0)
  sp = table[:, 0]
  dup = sp[1:][sp[1:] == sp[:-1]]
  if dup.size:
    raise FFNError(f"{where}: superpixel {int(dup[0])} is mapped to more than one body "
                   f"({dup.size} conflicting superpixel(s))")
  return table


def apply_transforms(superpixels: np.ndarray, table: np.ndarray, unmapped: str = "keep") -> np.ndarray:
  """Maps superpixel ids to body ids (int64 array, same shape).

  ``table``: validated [N, 2] int64 (superpixel, body), sorted by superpixel.
  ``unmapped``: what to do with ids not in the table: ``keep`` them, set them to ``zero``, or
  raise (``error``).
  """
  flat = superpixels.ravel().astype(np.int64, copy=False)
  keys, bodies = table[:, 0], table[:, 1]
  idx = np.searchsorted(keys, flat)
  idx_clipped = np.minimum(idx, max(len(keys) - 1, 0))
  found = (idx < len(keys)) & (keys[idx_clipped] == flat) if len(keys) else np.zeros(flat.shape, bool)
  out = np.where(found, bodies[idx_clipped] if len(keys) else 0, flat)
  missing = ~found & (flat != 0)
  if missing.any():
    if unmapped == "error":
      raise FFNError(f"{int(np.unique(flat[missing]).size)} superpixel id(s) are not in the transforms "
                     f"table (first: {int(flat[missing][0])})")
    if unmapped == "zero":
      out[missing] = 0
  return out.reshape(superpixels.shape)


def convert_groundtruth(superpixel_spec: str, transforms_spec: str, output_spec: str,
                        unmapped: str = "keep", slab_z: int = 32) -> dict:
  """Writes body labels for ``superpixel_spec`` to ``output_spec`` (int64, atomic), slab by slab.

  Returns counters: number of bodies, unmapped superpixels seen.
  """
  if unmapped not in UNMAPPED_POLICIES:
    raise FFNError(f"--unmapped must be one of {UNMAPPED_POLICIES}, got {unmapped!r}")
  out = parse_spec(output_spec)
  if out.dataset is None:
    raise FFNError(f"{output_spec}: output must be an HDF5 spec path.h5:dataset")
  table_spec = parse_spec(transforms_spec)
  if table_spec.dataset is None:
    raise FFNError(f"{transforms_spec}: transforms must be an HDF5 spec path.h5:dataset")
  with h5py.File(_existing(table_spec.path), "r") as f:
    if table_spec.dataset not in f:
      raise FFNError(f"{table_spec.path}: no dataset {table_spec.dataset!r}")
    table = validate_transforms(f[table_spec.dataset][()], str(table_spec))
  bodies: set[int] = set()
  unmapped_ids: set[int] = set()
  with Volume(superpixel_spec) as vol:
    check_dtype(str(vol.spec), vol.dtype, "ui")
    shape = vol.shape
    with atomic_path(out.path, suffix=".h5") as tmp:
      with h5py.File(tmp, "w") as f:
        ds = f.create_dataset(out.dataset, shape=shape, dtype=np.int64, compression="gzip",
                              chunks=(min(64, shape[0]), min(64, shape[1]), min(64, shape[2])))
        with Progress(shape[0], "apply transforms", unit="slices") as progress:
          for z0 in range(0, shape[0], slab_z):
            z1 = min(z0 + slab_z, shape[0])
            slab = vol[z0:z1]
            mapped = apply_transforms(slab, table, unmapped)
            missing = np.setdiff1d(np.unique(slab), np.append(table[:, 0], 0))
            unmapped_ids.update(int(v) for v in missing)
            bodies.update(int(v) for v in np.unique(mapped))
            ds[z0:z1] = mapped
            progress.update(z1 - z0)
  if unmapped_ids:
    _log.warning("%d superpixel id(s) are not in %s (policy: %s)", len(unmapped_ids), transforms_spec,
                 unmapped)
  return {"bodies": len(bodies - {0}), "unmapped_superpixels": len(unmapped_ids)}


def _existing(path: str) -> str:
  if not os.path.exists(path):
    raise FFNError(f"{path}: file not found")
  return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--superpixels", required=True, help="superpixel volume, e.g. groundtruth.h5:stack")
  parser.add_argument("--transforms", required=True,
                      help="(superpixel, body) table, e.g. groundtruth.h5:transforms")
  parser.add_argument("--output", required=True, help="output body labels, path.h5:dataset (int64)")
  parser.add_argument("--unmapped", choices=UNMAPPED_POLICIES, default="keep",
                      help="superpixels missing from the table: keep their id, set 0, or fail")


def run(args: argparse.Namespace) -> int:
  counters = convert_groundtruth(args.superpixels, args.transforms, args.output, args.unmapped)
  print(f"{args.output}: {counters['bodies']} bodies "
        f"({counters['unmapped_superpixels']} superpixel ids not in the table, policy {args.unmapped})")
  return 0
