"""Quiet TensorFlow start-up for the ``ffn`` entry points (``ffn --verbose`` keeps everything).

TensorFlow >= 2.19 logs through absl before absl is initialised, so ``TF_CPP_MIN_LOG_LEVEL`` no
longer hides the INFO lines its libraries print while ``import tensorflow`` runs (oneDNN custom
operations, twice, each after absl's "All log messages before absl::InitializeLog()" notice): four
lines before every command's output or one-line error. :func:`install` makes the first
``import tensorflow`` of the process, wherever it happens:

* capture file descriptor 2 while the import runs and write back what it caught except absl and TF
  INFO/WARNING lines (errors, fatal messages and Python warnings are kept; when the import fails,
  everything caught is written back);
* set ``TF_CPP_MIN_LOG_LEVEL=2`` (C++ INFO and WARNING lines after the import honour it) unless
  already set, and the ``tensorflow`` and ``absl`` Python loggers to ERROR;
* on a CPU-only TensorFlow build, switch grappler's ``remapper`` pass off. On the ConvStack3D
  graph it fails every time (``E... meta_optimizer.cc] remapper failed: INVALID_ARGUMENT:
  Mutation::Apply error: fanout 'Relu_N' exist for missing node 'add_M'`` -- the fusion it
  attempts deletes a residual block's ``add``, whose output also feeds the next block), and
  grappler then keeps the graph as it was. So switching it off changes nothing but that E-line:
  measured with TF 2.21 on CPU, the logits of inference and the loss and gradients of a training
  step are bitwise identical and equally fast with it on or off. CUDA builds keep the pass (its GPU
  fusions are not checked here); there the line can still appear once per graph, and is harmless.

It also warns (one line) when both ``tensorflow`` and ``tensorflow-cpu`` are installed: the two
wheels install the same files (15,622 shared paths in 2.21, 16 of them different binaries such as
``libtensorflow_framework.so.2``), so which build runs depends on which pip installed last.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile
from importlib import metadata
from importlib.machinery import ModuleSpec
from types import ModuleType

# absl's "I0000 00:00:..." / "W0000 ..." prefixes, its notice before InitializeLog, the CPU-feature
# line's continuation, and TF's older "2024-01-01 12:00:00.000000: I ..." format.
_NOISE = re.compile(r"(?:[IW]\d{4} \d\d:\d\d:\d+\.\d+ "
                    r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
                    r"|To enable the following instructions:"
                    r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IW] )")
_log = logging.getLogger(__name__)


def is_noise(line: str) -> bool:
  """Whether ``line`` (from stderr) is TensorFlow/absl INFO or WARNING output."""
  return _NOISE.match(line) is not None


def install() -> None:
  """Quiets the next first ``import tensorflow`` (see the module docstring); idempotent."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  for name in ("tensorflow", "absl"):
    logging.getLogger(name).setLevel(logging.ERROR)
  if "tensorflow" in sys.modules:
    return
  if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _Finder())


def _configure(tf: ModuleType) -> None:
  """Settings applied right after the import (before any graph is optimised), and a warning when
  the CPU and the CUDA build are both installed."""
  cuda = tf.sysconfig.get_build_info().get("is_cuda_build", False)
  if not cuda:
    tf.config.optimizer.set_experimental_options({"remapping": False})
  if _installed("tensorflow") and _installed("tensorflow-cpu"):
    _log.warning("tensorflow and tensorflow-cpu are both installed: they share the files of the "
                 "tensorflow package, so the build in use (here the %s one) is whichever pip "
                 "installed last, and uninstalling either breaks the other; keep one (README.md: "
                 "'Installing by hand, GPU')", "CUDA" if cuda else "CPU-only")


def _installed(distribution: str) -> bool:
  try:
    metadata.distribution(distribution)
  except metadata.PackageNotFoundError:
    return False
  return True


class _Finder(importlib.abc.MetaPathFinder):
  """Hands out the real ``tensorflow`` spec with its loader wrapped in :class:`_QuietLoader`."""

  def find_spec(self, fullname, path, target=None) -> ModuleSpec | None:
    if fullname != "tensorflow":
      return None
    sys.meta_path.remove(self)  # once: the other finders locate the package
    spec = importlib.util.find_spec(fullname)
    if spec is not None and spec.loader is not None:
      spec.loader = _QuietLoader(spec.loader)
    return spec


class _QuietLoader(importlib.abc.Loader):
  """The package's own loader, run with stderr captured and filtered."""

  def __init__(self, loader: importlib.abc.Loader):
    self._loader = loader

  def __getattr__(self, name: str):  # resource readers etc. of the real loader
    return getattr(self._loader, name)

  def create_module(self, spec: ModuleSpec):
    return self._loader.create_module(spec)

  def exec_module(self, module: ModuleType) -> None:
    sys.stderr.flush()
    saved = os.dup(2)
    ok = False
    with tempfile.TemporaryFile() as caught:
      os.dup2(caught.fileno(), 2)
      try:
        self._loader.exec_module(module)
        ok = True
      finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        caught.seek(0)
        lines = caught.read().decode(errors="replace").splitlines(keepends=True)
        sys.stderr.write("".join(line for line in lines if not (ok and is_noise(line))))
        sys.stderr.flush()
    _configure(module)
