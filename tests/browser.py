"""Headless Chromium for the tests that check pages in a real browser (``tests/test_viewer.py``:
Neuroglancer; ``tests/test_pipeline_report.py``: the pipeline's report.html).

Chromium (Debian's ``chromium``, or ``$FFN_CHROMIUM``; ``run_tests.sh`` installs it as root) is
driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: NUL-separated JSON
messages on file descriptors 3 and 4), WebGL rendered by SwiftShader on the CPU. One
:class:`Browser` holds one page; the DevTools events that arrive meanwhile (console messages,
network requests, load events of the domains a test enabled) are kept in :attr:`Browser.events`.
Without Chromium, :func:`chromium_binary` fails the test when the env var CI is set and skips it
otherwise (``conftest.missing``).

Test modules import the fixture (``from browser import browser``) to use it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import select
import shutil
import signal
import subprocess
import time
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from conftest import missing

WINDOW = (1200, 900)  # width, height (CSS pixels = screenshot pixels)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                  "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-extensions",
                  f"--window-size={WINDOW[0]},{WINDOW[1]}"]


def chromium_binary() -> str:
  """Path of Chromium (``$FFN_CHROMIUM`` or ``chromium`` on PATH); :func:`missing` when absent."""
  path = os.environ.get("FFN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
  if not path:
    missing("needs Chromium for the headless-browser tests "
            "(apt-get install chromium; run_tests.sh does it as root)")
  return path


class Browser:
  """Headless Chromium driven over the DevTools protocol on a pipe; one page."""

  def __init__(self, binary: str, profile: str) -> None:
    to_chrome_r, self._to_chrome = os.pipe()
    self._from_chrome, from_chrome_w = os.pipe()

    def as_fds_3_and_4() -> None:  # in the child: the pipe ends where --remote-debugging-pipe reads
      os.dup2(to_chrome_r, 3)
      os.dup2(from_chrome_w, 4)

    self._log = open(os.path.join(profile, "chromium.log"), "wb")
    self.proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                  "--remote-debugging-pipe", "about:blank"],
                                 stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                                 preexec_fn=as_fds_3_and_4, pass_fds=(3, 4), start_new_session=True)
    os.close(to_chrome_r)
    os.close(from_chrome_w)
    self._buffer = b""
    self._next_id = 0
    self.session = None
    self.events: list[dict] = []  # {"method": ..., "params": ...} of the page, in arrival order
    target = self.call("Target.createTarget", url="about:blank")["targetId"]
    self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    self.call("Emulation.setDeviceMetricsOverride", width=WINDOW[0], height=WINDOW[1],
              deviceScaleFactor=1, mobile=False)

  def _receive(self, deadline: float, waiting_for: str) -> None:
    """Reads what Chromium sent into the buffer (blocks until something arrives or ``deadline``)."""
    left = deadline - time.monotonic()
    if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
      raise TimeoutError(f"Chromium did not answer {waiting_for} in time")
    chunk = os.read(self._from_chrome, 1 << 20)
    if not chunk:
      raise RuntimeError(f"Chromium exited (log: {self._log.name})")
    self._buffer += chunk

  def _messages(self) -> Iterator[dict]:
    """The complete messages in the buffer; page events are also appended to :attr:`events`."""
    while b"\0" in self._buffer:
      raw, self._buffer = self._buffer.split(b"\0", 1)
      message = json.loads(raw)
      if "method" in message and message.get("sessionId") == self.session:
        self.events.append({"method": message["method"], "params": message.get("params", {})})
      yield message

  def call(self, method: str, timeout_s: float = 60.0, **params) -> dict:
    """Sends one command (to the page once attached) and returns its result."""
    self._next_id += 1
    message = {"id": self._next_id, "method": method, "params": params}
    if self.session and not method.startswith(("Target.", "Browser.")):
      message["sessionId"] = self.session
    os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
    deadline = time.monotonic() + timeout_s
    while True:
      for reply in self._messages():
        if reply.get("id") == self._next_id:
          if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
          return reply["result"]
      self._receive(deadline, method)

  def wait_event(self, method: str, timeout_s: float = 60.0) -> dict:
    """The params of the first page event ``method`` in :attr:`events` (waits for it)."""
    deadline = time.monotonic() + timeout_s
    while True:
      for message in self._messages():
        pass
      for event in self.events:
        if event["method"] == method:
          return event["params"]
      self._receive(deadline, f"with the event {method}")

  def evaluate(self, expression: str):
    result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
    if "exceptionDetails" in result:
      raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
    return result["result"].get("value")

  def screenshot(self) -> np.ndarray:
    """The page as an RGB uint8 array (height, width, 3)."""
    data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

  def close(self) -> None:
    try:
      self.call("Browser.close", timeout_s=10)
      self.proc.wait(timeout=20)
    except (OSError, RuntimeError, TimeoutError, subprocess.TimeoutExpired):
      os.killpg(self.proc.pid, signal.SIGKILL)
      self.proc.wait(timeout=20)
    finally:
      os.close(self._to_chrome)
      os.close(self._from_chrome)
      self._log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[Browser]:
  """One headless Chromium per test module (see :func:`chromium_binary` when absent)."""
  binary = chromium_binary()
  b = Browser(binary, str(tmp_path_factory.mktemp("chromium-profile")))
  try:
    yield b
  finally:
    b.close()
