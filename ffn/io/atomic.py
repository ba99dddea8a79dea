"""Atomic file writes: write to a temporary name in the target directory, then rename.

A reader (or a restarted job) therefore sees either the old file or the complete new one, never a
half-written file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from ffn.errors import FFNError


def check_writable_dir(path: str | os.PathLike) -> Path:
  """Creates the parent directory of ``path`` if needed and checks it is writable."""
  parent = Path(path).absolute().parent
  try:
    parent.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise FFNError(f"{path}: cannot create output directory {parent}: {e.strerror}") from None
  if not os.access(parent, os.W_OK | os.X_OK):
    raise FFNError(f"{path}: output directory {parent} is not writable")
  return parent


def _current_umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
  """Yields a temporary path beside ``path``; on success renames it onto ``path``.

  On an exception the temporary file is removed and ``path`` is left untouched.
  """
  parent = check_writable_dir(path)
  target = Path(path)
  fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=parent)
  os.close(fd)
  tmp = Path(tmp_name)
  try:
    yield tmp
    os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the usual permissions
    os.replace(tmp, target)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      tmp.unlink()
    raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically."""
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  write_bytes_atomic(path, text.encode("utf-8"))
