"""Volume specs and lazy, chunked volume access.

Spec syntax (google/ffn compatible, plus image stacks and TensorStore):

* ``path.h5:dataset`` -- an HDF5 dataset;
* ``name:path.h5:dataset`` -- the same, with a volume name (used by coordinate files and training
  flags such as ``--data_volumes``);
* ``dir/`` or ``dir/*.png`` -- a stack of 2D PNG/TIFF slices, one per z, in natural name order
  (``img2.png`` before ``img10.png``);
* ``volume.tif`` -- a multi-page TIFF, one page per z;
* ``zarr://path``, ``n5://path``, ``precomputed://path`` (optionally ``name:`` in front) or a
  TensorStore JSON spec (``{"driver": ..., "kvstore": ...}``) -- read through TensorStore
  (:mod:`ffn.io.tensorstore_volumes`).

All arrays are z,y,x (:mod:`ffn.axes`). A volume is 3D (z,y,x) or, where channels make sense
(images, masks, shift masks), 4D (channel,z,y,x, google/ffn's layout; a Neuroglancer precomputed
volume's x,y,z,channel is presented the same way). Reads of a box never load the whole volume:
HDF5 and TensorStore read only the chunks that intersect the box, image stacks only the slices in
the z range.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Sequence

import h5py
import numpy as np

from ffn.axes import BoundingBox
from ffn.errors import FFNError
from ffn.io.atomic import atomic_path

H5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".h5py")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
TENSORSTORE_SCHEMES = ("zarr", "n5", "precomputed")


@dataclasses.dataclass(frozen=True)
class VolumeSpec:
  """A parsed volume spec. ``dataset`` is None for image stacks and TensorStore volumes.

  ``scheme``: "zarr", "n5", "precomputed" (``path`` is then the local path) or "json" (``path``
  is the TensorStore JSON spec); None for HDF5 and image stacks. ``channel``: for a 4D
  (channel,z,y,x) volume, the channel read as the 3D volume; None: the volume must be 3D.
  """
  path: str
  dataset: str | None = None
  name: str | None = None
  scheme: str | None = None
  channel: int | None = None

  def __str__(self) -> str:
    if self.scheme == "json":
      text = self.path
    elif self.scheme is not None:
      text = f"{self.scheme}://{self.path}"
    else:
      text = self.path if self.dataset is None else f"{self.path}:{self.dataset}"
    return text if self.name is None else f"{self.name}:{text}"


def _parse_tensorstore_spec(spec: str) -> VolumeSpec | None:
  """``[name:]scheme://path`` or a JSON spec as a VolumeSpec; None if ``spec`` is neither."""
  text = spec.strip()
  if text.startswith("{"):
    return VolumeSpec(path=text, scheme="json")
  if "://" not in text:
    return None
  head, path = text.split("://", 1)
  name, _, scheme = head.rpartition(":")
  if scheme not in TENSORSTORE_SCHEMES:
    raise FFNError(f"volume spec {spec!r}: unknown scheme {scheme + '://'!r} (expected "
                   f"{', '.join(s + '://' for s in TENSORSTORE_SCHEMES)}, or [name:]path.h5:dataset)")
  if not path:
    raise FFNError(f"volume spec {spec!r}: no path after {scheme}://")
  if head.count(":") > 1 or (":" in head and not name):
    raise FFNError(f"volume spec {spec!r}: expected [name:]{scheme}://path")
  return VolumeSpec(path=path, name=name or None, scheme=scheme)


def parse_spec(spec: str, require_name: bool = False) -> VolumeSpec:
  """Parses a volume spec string (see the module docstring)."""
  if not spec or not isinstance(spec, str):
    raise FFNError(f"empty volume spec {spec!r}")
  out = _parse_tensorstore_spec(spec)
  parts = spec.split(":")
  if out is not None:
    pass
  elif len(parts) == 3:
    name, path, dataset = parts
    if not name or not path or not dataset:
      raise FFNError(f"volume spec {spec!r}: expected name:path.h5:dataset")
    out = VolumeSpec(path=path, dataset=dataset, name=name)
  elif len(parts) == 2:
    path, dataset = parts
    if not path or not dataset:
      raise FFNError(f"volume spec {spec!r}: expected path.h5:dataset")
    out = VolumeSpec(path=path, dataset=dataset)
  elif len(parts) == 1:
    out = VolumeSpec(path=spec)
  else:
    raise FFNError(f"volume spec {spec!r}: too many ':' (expected [name:]path.h5:dataset)")
  if require_name and out.name is None:
    raise FFNError(f"volume spec {spec!r}: a name is required here (name:path.h5:dataset)")
  return out


def parse_named_specs(text: str | Sequence[str]) -> dict[str, VolumeSpec]:
  """Parses google/ffn's comma-separated ``name:path:dataset,...`` list into {name: spec}."""
  items = text.split(",") if isinstance(text, str) else list(text)
  out: dict[str, VolumeSpec] = {}
  for item in items:
    item = item.strip()
    if not item:
      continue
    spec = parse_spec(item, require_name=True)
    if spec.name in out:
      raise FFNError(f"volume name {spec.name!r} is given twice in {text!r}")
    out[spec.name] = spec  # type: ignore[index]
  if not out:
    raise FFNError(f"no volumes given in {text!r}")
  return out


def _natural_key(text: str) -> list:
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def list_slice_files(path: str) -> list[str]:
  """Image files of a slice stack (a directory or a glob), in natural name order."""
  if os.path.isdir(path):
    files = [os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES)]
  else:
    files = glob.glob(path)
  files = sorted(files, key=_natural_key)
  if not files:
    raise FFNError(f"{path}: no PNG/TIFF slices found")
  return files


def _read_image(path: str) -> np.ndarray:
  if path.lower().endswith((".tif", ".tiff")):
    import tifffile
    return tifffile.imread(path)
  from PIL import Image
  with Image.open(path) as im:
    return np.asarray(im)


class Volume:
  """Read access to a 3D volume (z,y,x) without loading it whole.

  Index it like a numpy array (``vol[z0:z1, y0:y1, x0:x1]``) or call :meth:`read_box`.
  A 4D (channel,z,y,x) HDF5 or TensorStore volume is accepted with ``channels=True`` or a spec
  whose ``channel`` is set: indexing then reads that channel (default 0), ``num_channels`` is the
  channel count and :meth:`read_channels` reads several. ``shape`` is always z,y,x.
  Use as a context manager, or call :meth:`close`.
  """

  def __init__(self, spec: str | VolumeSpec, channels: bool = False):
    self.spec = parse_spec(spec) if isinstance(spec, str) else spec
    self._h5: h5py.File | None = None
    self._ds = None  # HDF5 dataset or TensorStore array: (channel,)z,y,x
    self._files: list[str] | None = None
    self._tiff = None
    self.num_channels: int | None = None  # None: a 3D volume
    self.channel = self.spec.channel or 0
    path = self.spec.path
    if self.spec.scheme is not None:
      from ffn.io.tensorstore_volumes import open_volume_array
      self._ds = open_volume_array(self.spec)
      self._set_array_shape(tuple(self._ds.shape), channels)
      self.dtype = self._ds.dtype.numpy_dtype
    elif self.spec.dataset is not None:
      self._h5, ds = open_h5_dataset(self.spec)
      self._ds = ds
      try:
        self._set_array_shape(tuple(ds.shape), channels)
      except FFNError:
        self.close()
        raise
      self.dtype = ds.dtype
    elif os.path.isfile(path) and path.lower().endswith((".tif", ".tiff")):
      import tifffile
      self._tiff = tifffile.TiffFile(path)
      try:
        first = self._tiff.pages[0].asarray()
        self._check_slice(first, path)
      except BaseException:
        self.close()
        raise
      self.shape = (len(self._tiff.pages),) + first.shape  # type: ignore[assignment]
      self.dtype = first.dtype
    elif os.path.isfile(path) and path.lower().endswith(H5_SUFFIXES):
      raise FFNError(f"{path}: HDF5 volume needs a dataset name (path.h5:dataset)")
    else:
      if not os.path.exists(path) and not glob.glob(path):
        raise FFNError(f"{path}: file or directory not found")
      self._files = list_slice_files(path)
      first = _read_image(self._files[0])
      self._check_slice(first, self._files[0])
      self.shape = (len(self._files),) + first.shape  # type: ignore[assignment]
      self.dtype = first.dtype
    if self.num_channels is None and self.spec.channel:
      raise FFNError(f"{self.spec}: channel {self.spec.channel} requested of a 3D volume (only "
                     "channel 0)")
    if 0 in self.shape:
      raise FFNError(f"{self.spec}: the volume is empty (shape {list(self.shape)[::-1]}, x,y,z)")

  def _set_array_shape(self, shape: tuple, channels: bool) -> None:
    allow = channels or self.spec.channel is not None
    if len(shape) == 4 and allow:
      self.num_channels = int(shape[0])
      if not 0 <= self.channel < self.num_channels:
        raise FFNError(f"{self.spec}: no channel {self.channel} (the volume has {self.num_channels}; "
                       "4D volumes are channel,z,y,x)")
      self.shape = shape[1:]  # type: ignore[assignment]
    elif len(shape) == 3:
      self.shape = shape  # type: ignore[assignment]
    else:
      want = "3D (z,y,x) or 4D (channel,z,y,x)" if allow else "3D (z,y,x)"
      raise FFNError(f"{self.spec}: expected a {want} volume, got shape {list(shape)}")

  @staticmethod
  def _check_slice(img: np.ndarray, where: str) -> None:
    if img.ndim != 2:
      raise FFNError(f"{where}: expected a single-channel 2D slice, got shape {img.shape}")

  def _read_slice(self, z: int) -> np.ndarray:
    if self._tiff is not None:
      img = self._tiff.pages[z].asarray()
      where = f"{self.spec.path} page {z}"
    else:
      assert self._files is not None
      where = self._files[z]
      img = _read_image(where)
    if img.shape != self.shape[1:]:
      raise FFNError(f"{where}: slice shape {img.shape} differs from the first slice {self.shape[1:]}")
    return img

  def _read_array(self, key: tuple) -> np.ndarray:
    if self.spec.scheme is not None:
      return np.asarray(self._ds[key].read().result())  # type: ignore[index]
    return self._ds[key]  # type: ignore[index]

  def __getitem__(self, key) -> np.ndarray:
    if self._ds is not None:
      if not isinstance(key, tuple):
        key = (key,)
      lead = () if self.num_channels is None else (self.channel,)
      return self._read_array(lead + key)
    if not isinstance(key, tuple):
      key = (key,)
    key = key + (slice(None),) * (3 - len(key))
    zs = range(self.shape[0])[key[0]] if isinstance(key[0], slice) else [key[0]]
    planes = [self._read_slice(z)[key[1], key[2]] for z in zs]
    if not isinstance(key[0], slice):
      return planes[0]
    return np.stack(planes) if planes else np.zeros((0,) + self.shape[1:], self.dtype)[:, key[1], key[2]]

  def read_channels(self, channels: slice, key: tuple) -> np.ndarray:
    """Channels ``channels`` of the z,y,x slices ``key``, as (channel,z,y,x); a 3D volume has one."""
    if self.num_channels is None:
      return self[key][np.newaxis][channels]
    return self._read_array((channels,) + tuple(key))

  def read_box(self, box: BoundingBox) -> np.ndarray:
    """Reads a box (start/size in x,y,z) as a z,y,x array; the box must lie inside the volume."""
    check_box_inside(box, self.shape, str(self.spec))
    return self[box.to_slices()]

  def read_all(self) -> np.ndarray:
    return self[:, :, :]

  def close(self) -> None:
    if self._h5 is not None:
      self._h5.close()
      self._h5 = None
    if self._tiff is not None:
      self._tiff.close()
      self._tiff = None
    self._ds = None

  def __enter__(self) -> "Volume":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _list_datasets(f: h5py.File) -> list[str]:
  names: list[str] = []
  f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
  return names


def open_h5_dataset(spec: str | VolumeSpec, what: str = "") -> tuple[h5py.File, h5py.Dataset]:
  """Opens ``path.h5:dataset`` for reading; returns (file, dataset), the caller closes the file.

  Any problem (not an HDF5 spec, no file, unreadable, no such dataset, a group) is one FFNError
  naming the file and, if given, ``what`` the volume is for (e.g. a request field).
  """
  spec = parse_spec(spec) if isinstance(spec, str) else spec
  why = f" ({what})" if what else ""
  if spec.dataset is None:
    raise FFNError(f"{spec.path}: expected an HDF5 volume 'file.h5:dataset'{why}")
  if not os.path.exists(spec.path):
    raise FFNError(f"{spec.path}: file not found (volume {spec}){why}")
  try:
    f = h5py.File(spec.path, "r")
  except OSError as e:
    raise FFNError(f"{spec.path}: not a readable HDF5 file ({e}){why}") from None
  if spec.dataset not in f:
    names = _list_datasets(f)
    f.close()
    raise FFNError(f"{spec.path}: no dataset {spec.dataset!r} (datasets: {', '.join(names) or 'none'})"
                   f"{why}")
  ds = f[spec.dataset]
  if not isinstance(ds, h5py.Dataset):
    f.close()
    raise FFNError(f"{spec.path}:{spec.dataset} is a group, not a dataset{why}")
  return f, ds


def _open_for(spec: str | VolumeSpec, what: str) -> Volume:
  """:class:`Volume` (4D allowed) whose errors name ``what`` the volume is for."""
  try:
    return Volume(spec, channels=True)
  except FFNError as e:
    if what and f"({what})" not in str(e):
      raise FFNError(f"{e} ({what})") from None
    raise


def read_h5_box(spec: str | VolumeSpec, corner_zyx: Sequence[int], shape_zyx: Sequence[int],
                channels: int | None = None, fill_outside: bool = False, what: str = "") -> np.ndarray:
  """Reads the z,y,x box ``corner_zyx`` + ``shape_zyx`` of a 3D or 4D volume (HDF5 or TensorStore).

  ``channels`` None: the volume is 3D (z,y,x) or 4D (channel,z,y,x; channel 0 is read) and the
  result is z,y,x. ``channels`` n: the volume must be 4D with at least n channels; the result is
  channels 0..n-1, (n,z,y,x). ``fill_outside``: voxels of the box outside the volume are 0
  (otherwise a box not inside the volume is an FFNError). ``what``: named in errors.
  """
  where = f"{spec}" + (f" ({what})" if what else "")
  with _open_for(spec, what) as vol:
    if channels is not None and (vol.num_channels or 0) < channels:
      shape = list(vol.shape) if vol.num_channels is None else [vol.num_channels] + list(vol.shape)
      raise FFNError(f"{where}: must be 4D (channel,z,y,x) with at least {channels} channels, "
                     f"got shape {shape}")
    spatial = np.array(vol.shape, dtype=np.int64)
    lo = np.array(corner_zyx, dtype=np.int64)
    hi = lo + np.array(shape_zyx, dtype=np.int64)
    if not fill_outside and (np.any(lo < 0) or np.any(hi > spatial)):
      raise FFNError(f"{where}: shape {spatial.tolist()[::-1]} (x,y,z) does not cover the box at "
                     f"{lo.tolist()[::-1]} of size {list(shape_zyx)[::-1]} (x,y,z)")
    out = np.zeros(((channels,) if channels is not None else ()) + tuple((hi - lo).tolist()), vol.dtype)
    clo, chi = np.clip(lo, 0, spatial), np.clip(hi, 0, spatial)
    if np.all(chi > clo):
      dst = tuple(slice(int(a - l), int(b - l)) for a, b, l in zip(clo, chi, lo))
      src = tuple(slice(int(a), int(b)) for a, b in zip(clo, chi))
      out[(Ellipsis,) + dst] = vol[src] if channels is None else vol.read_channels(
          slice(0, channels), src)
  return out


def read_label_box(spec: str | VolumeSpec, corner_zyx: Sequence[int], shape_zyx: Sequence[int],
                   what: str = "") -> np.ndarray:
  """:func:`read_h5_box` of object ids (3D, or channel 0 of a 4D volume): an integer dtype and no
  negative id, else FFNError."""
  where = f"{spec}" + (f" ({what})" if what else "")
  with _open_for(spec, what) as vol:
    check_dtype(where, vol.dtype, "uib")
  labels = read_h5_box(spec, corner_zyx, shape_zyx, what=what)
  if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
    raise FFNError(f"{spec}: has negative ids (min {labels.min()}; {what}); ids must be >= 0")
  return labels


def check_box_inside(box: BoundingBox, shape_zyx: Sequence[int], where: str) -> None:
  """Raises FFNError if ``box`` (x,y,z) is not inside a volume of shape ``shape_zyx``."""
  size_xyz = np.array(list(reversed(shape_zyx)))
  if np.any(box.start < 0) or np.any(box.end > size_xyz):
    raise FFNError(f"{where}: bounding box start={box.start.tolist()} size={box.size.tolist()} (x,y,z) "
                   f"is outside the volume of size {size_xyz.tolist()} (x,y,z)")


def open_volume(spec: str | VolumeSpec) -> Volume:
  return Volume(spec)


_KIND_NAMES = {"u": "unsigned integer", "i": "signed integer", "f": "floating point", "b": "boolean"}


def check_dtype(where: str, dtype: np.dtype, kinds: str) -> None:
  """Raises FFNError unless ``dtype.kind`` is one of ``kinds`` (numpy kind letters, e.g. "ui")."""
  if np.dtype(dtype).kind not in kinds:
    allowed = " or ".join(_KIND_NAMES.get(k, k) for k in kinds)
    raise FFNError(f"{where}: dtype {np.dtype(dtype).name} is not allowed here (expected {allowed})")


def read_volume(spec: str | VolumeSpec, box: BoundingBox | None = None,
                dtype_kinds: str | None = None) -> np.ndarray:
  """Reads a whole volume (or a box of it) into memory as a z,y,x array.

  ``dtype_kinds``: if given, the allowed numpy dtype kind letters (e.g. "ui" for integers).
  """
  with Volume(spec) as vol:
    if dtype_kinds is not None:
      check_dtype(str(vol.spec), vol.dtype, dtype_kinds)
    return vol.read_box(box) if box is not None else vol.read_all()


def h5_has_dataset(path: str, dataset: str) -> bool:
  """Whether the HDF5 file ``path`` exists and holds ``dataset`` (an unreadable file is an FFNError)."""
  if not os.path.exists(path):
    return False
  try:
    with h5py.File(path, "r") as f:
      return dataset in f
  except OSError as e:
    raise FFNError(f"{path}: not a readable HDF5 file ({e})") from None


def write_h5(path: str, dataset: str, data: np.ndarray, attrs: dict | None = None,
             compression: str | None = "gzip", chunks: bool | tuple = True) -> None:
  """Writes ``data`` as ``path:dataset`` atomically.

  If ``path`` already exists, its other datasets are kept: under an exclusive lock for ``path``
  (:func:`ffn.io.atomic.exclusive_lock`, so concurrent writers of other datasets of the same file
  keep each other's), the file is copied to a temporary name, the dataset replaced there, the copy
  flushed to disk and renamed over the original.
  """
  from ffn.io.atomic import exclusive_lock
  with exclusive_lock(path), atomic_path(path, suffix=".h5") as tmp:
    if os.path.exists(path):
      import shutil
      shutil.copyfile(path, tmp)
      mode = "a"
    else:
      mode = "w"
    with h5py.File(tmp, mode) as f:
      if dataset in f:
        del f[dataset]
      ds = f.create_dataset(dataset, data=data, compression=compression,
                            chunks=chunks if data.size else None)
      for k, v in (attrs or {}).items():
        ds.attrs[k] = v


def write_spec(spec: str | VolumeSpec, data: np.ndarray, attrs: dict | None = None) -> None:
  """Writes a z,y,x array to an HDF5 spec (``path.h5:dataset``) atomically."""
  spec = parse_spec(spec) if isinstance(spec, str) else spec
  if spec.dataset is None:
    raise FFNError(f"{spec}: output must be an HDF5 spec path.h5:dataset")
  write_h5(spec.path, spec.dataset, data, attrs)
