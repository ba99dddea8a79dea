"""Atomic writes: build the output under a temporary name beside it, then rename it into place.

A reader, a concurrent writer or a restarted job therefore sees either the old output or the
complete new one, never a half-written one -- also after SIGKILL or a power cut:

* :func:`atomic_path` (one file): the temporary file is created with mode 0666 and the kernel
  applies the process umask (and any default ACL), exactly as for a plain ``open``; the process
  umask itself is never read or changed (other threads may be creating files meanwhile). On success
  the file's data is flushed to disk (``fsync``) before it is renamed over the target, so that
  after a crash the name holds the old or the new content, never a truncated file. (The rename
  itself is made durable by the file system's next journal commit; the directory is not fsynced,
  which costs up to tens of milliseconds per file on a busy ext4.)
* :func:`atomic_dir` (a folder of files: PNG stacks, Neuroglancer precomputed layers): the new
  folder is built under a temporary name and *exchanged* with the old one in one step
  (``renameat2(RENAME_EXCHANGE)``, Linux >= 3.15 on local file systems); the old content, now
  under the temporary name, is then deleted. Where the file system cannot exchange (e.g. NFS),
  the old folder is first renamed aside: between the two renames the target is briefly absent
  (never mixed), and the old folder survives under a temporary name until it is cleaned.

Temporary names are ``.<target name>.~<host>~<pid namespace>~<pid>~<random><suffix>.tmp``. A
writer killed before it renamed leaves its temporary behind; the first atomic write of a process
into a directory removes such leftovers there (:func:`clean_stale_temps`): those of this host and
pid namespace whose process is gone (or a zombie), those of other hosts untouched for
``STALE_FOREIGN_S`` seconds, and lock files of :func:`exclusive_lock` that nobody holds. A live
writer's temporary or lock is never removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import secrets
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

from ffn.errors import FFNError

STALE_FOREIGN_S = 24 * 3600.0  # temporaries of other hosts untouched this long are removed
_TEMP_RE = re.compile(r"^\..+\.~(?P<host>[^~/]+)~(?P<ns>\d+)~(?P<pid>\d+)~[0-9a-f]{8}[^~/]*\.tmp$")
LOCK_SUFFIX = ".ffn-lock"
_cleaned: set[str] = set()  # directories this process already cleaned
_cleaned_lock = threading.Lock()


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


def check_output_file(path: str | os.PathLike) -> Path:
  """:func:`check_writable_dir`, and ``path`` is not a directory (a file goes there)."""
  if Path(path).is_dir():
    raise FFNError(f"{path}: is a directory; give a file name")
  return check_writable_dir(path)


def _pid_namespace() -> int:
  """Inode of this process's pid namespace (0 where /proc does not tell): pids are only
  comparable within one namespace."""
  try:
    return os.stat("/proc/self/ns/pid").st_ino
  except OSError:
    return 0


def _host() -> str:
  return socket.gethostname().replace("~", "_").replace("/", "_") or "localhost"


def temp_name(target: str | os.PathLike, suffix: str = "") -> Path:
  """A fresh temporary name beside ``target`` (format in the module docstring)."""
  target = Path(target)
  token = f"~{_host()}~{_pid_namespace()}~{os.getpid()}~{secrets.token_hex(4)}"
  return target.parent / f".{target.name}.{token}{suffix}.tmp"


def _pid_alive(pid: int) -> bool:
  """Whether process ``pid`` (this pid namespace) exists and is not a zombie."""
  if pid == os.getpid():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  try:
    with open(f"/proc/{pid}/stat", "rb") as f:
      state = f.read().rsplit(b")", 1)[1].split()[0]
    return state not in (b"Z", b"X")
  except (OSError, IndexError):
    return True


def _newest_mtime(path: Path) -> float:
  newest = path.lstat().st_mtime
  if path.is_dir() and not path.is_symlink():
    for root, dirs, files in os.walk(path):
      for name in dirs + files:
        with contextlib.suppress(OSError):
          newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
  return newest


def _remove(path: Path) -> None:
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path, ignore_errors=True)
  else:
    with contextlib.suppress(FileNotFoundError):
      path.unlink()


def clean_stale_temps(directory: str | os.PathLike) -> list[Path]:
  """Removes the temporaries of dead writers in ``directory`` (module docstring); returns them."""
  directory = Path(directory)
  host, ns = _host(), str(_pid_namespace())
  removed = []
  try:
    entries = list(os.scandir(directory))
  except OSError:
    return removed
  now = time.time()
  for entry in entries:
    if entry.name.startswith(".") and entry.name.endswith(LOCK_SUFFIX):
      if _remove_free_lock(Path(entry.path)):
        removed.append(Path(entry.path))
      continue
    match = _TEMP_RE.match(entry.name)
    if match is None:
      continue
    path = Path(entry.path)
    try:
      if match["host"] == host and match["ns"] == ns:
        stale = not _pid_alive(int(match["pid"]))
      else:
        stale = now - _newest_mtime(path) > STALE_FOREIGN_S
    except OSError:
      continue
    if stale:
      _remove(path)
      removed.append(path)
  return removed


def _remove_free_lock(lock: Path) -> bool:
  """Removes the lock file of :func:`exclusive_lock` if nobody holds it (a killed holder's)."""
  try:
    fd = os.open(lock, os.O_RDWR)
  except OSError:
    return False
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    if os.stat(lock).st_ino != os.fstat(fd).st_ino:
      return False
    os.unlink(lock)
    return True
  except OSError:
    return False
  finally:
    os.close(fd)


def _clean_once(directory: Path) -> None:
  key = str(directory)
  with _cleaned_lock:
    if key in _cleaned:
      return
    _cleaned.add(key)
  clean_stale_temps(directory)


def _fsync(path: str | os.PathLike, directory: bool = False) -> None:
  """Flushes a file's (or directory's) data to disk; a no-op where the file system cannot."""
  flags = os.O_RDONLY | (os.O_DIRECTORY if directory else 0)
  fd = os.open(path, flags)
  try:
    os.fsync(fd)
  except OSError as e:
    if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # a file system without fsync of this kind
      raise
  finally:
    os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
  """Yields a temporary path beside ``path`` (an empty file); on success renames it onto ``path``.

  On an exception the temporary file is removed and ``path`` is left untouched.
  """
  parent = check_output_file(path)
  target = Path(path)
  _clean_once(parent)
  while True:
    tmp = temp_name(target, suffix)
    try:
      os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
      break
    except FileExistsError:
      continue
  try:
    yield tmp
    _fsync(tmp)
    os.replace(tmp, target)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      tmp.unlink()
    raise


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
  """Swaps the two existing paths ``a`` and ``b`` in one step; False where this is unsupported."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = libc.renameat2
  except (OSError, AttributeError):
    return False
  renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
  if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
    return False
  raise OSError(err, os.strerror(err), str(b))


def _fsync_tree(root: Path) -> None:
  for dirpath, _, files in os.walk(root):
    for name in files:
      _fsync(os.path.join(dirpath, name))
    _fsync(dirpath, directory=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
  """Yields a new empty temporary directory beside ``path``; on success it replaces ``path``
  (a directory or absent) in one step (module docstring). On an exception it is removed and
  ``path`` is left untouched."""
  parent = check_writable_dir(path)
  _clean_once(parent)
  target = Path(path)
  while True:
    tmp = temp_name(target)
    try:
      os.mkdir(tmp, 0o777)
      break
    except FileExistsError:
      continue
  try:
    yield tmp
    _fsync_tree(tmp)
    old = _swap_in(tmp, target)
    if old is not None:
      _remove(old)
  except BaseException:
    _remove(tmp)
    raise


def _swap_in(tmp: Path, target: Path) -> Path | None:
  """Puts the directory ``tmp`` at ``target``; returns where the old ``target`` now is (to be
  removed; a temporary name), or None if there was none."""
  while True:
    if not (target.exists() or target.is_symlink()):
      try:
        os.rename(tmp, target)
        return None
      except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
          raise
        continue  # another writer just created it: exchange with that one
    if _exchange(tmp, target):
      return tmp  # the old content, under the temporary name
    aside = temp_name(target)
    os.rename(target, aside)
    try:
      os.rename(tmp, target)
    except OSError:
      os.rename(aside, target)
      raise
    return aside


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[None]:
  """Holds an exclusive lock for ``path``: writers that read, modify and replace ``path`` take it
  so that none of them loses another's change. Threads and processes (also on other hosts where
  the file system supports ``flock``) wait for each other.

  The lock is an ``flock`` on the file ``.<name>.ffn-lock`` beside ``path``, removed again by
  its holder on release; a waiter that then holds the lock of a removed file (its inode no longer
  at that name) tries again, so two writers never hold "the" lock at once. A killed holder's file
  is removed by :func:`clean_stale_temps` under the same protocol.
  """
  target = Path(path)
  lock = check_writable_dir(target) / f".{target.name}{LOCK_SUFFIX}"
  while True:
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
      try:
        current = os.stat(lock)
      except FileNotFoundError:
        current = None
      if current is not None and current.st_ino == os.fstat(fd).st_ino:
        break
    except BaseException:
      os.close(fd)
      raise
    os.close(fd)
  try:
    yield
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(lock)
    os.close(fd)  # releases the lock


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically."""
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  write_bytes_atomic(path, text.encode("utf-8"))
