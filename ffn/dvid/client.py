"""A small client of DVID's HTTP API (``labelmap`` instances, nodes, repos) over ``requests``.

One :class:`DvidClient` per server: a ``requests.Session`` whose every request carries DVID's
``u=<user>`` and ``app=<app>`` query parameters (DVID records them with each mutation), with a
connect and a read timeout.

Retries: requests that are safe to repeat (GETs, and POSTs whose repetition leaves the same state:
``raw`` voxels) are retried with exponential backoff on connection errors, timeouts and 5xx
answers, never on 4xx. A ``merge`` is never repeated here: a merge whose answer was lost may have
been applied, so :mod:`ffn.dvid.merges` reads the mapping to find out before posting it again.

Errors: DVID answers a bad request with status 400 and a plain-text line (``Could not find UUID
with partial match to 1234! (/api/node/1234/seg/info).``); :class:`DvidError` carries it as one
line, as an :class:`~ffn.errors.FFNError` (the CLI prints it and exits 2). A server that does not
answer after the retries is a :class:`DvidUnreachable`.

Coordinates and sizes are x,y,z in URLs and JSON (DVID's order); arrays are z,y,x.
"""

from __future__ import annotations

import getpass
import json
import logging
import time
from typing import Any, Sequence

import numpy as np
import requests

from ffn.errors import FFNError

_log = logging.getLogger(__name__)

DEFAULT_APP = "ffn"
CONNECT_TIMEOUT_S = 10.0


class DvidError(FFNError):
  """DVID refused a request (``status`` 4xx, or 5xx after the retries); ``text``: DVID's line."""

  def __init__(self, message: str, status: int | None = None, text: str = ""):
    super().__init__(message)
    self.status = status
    self.text = text


class DvidUnreachable(DvidError):
  """No answer from the server (connection refused, reset or timed out) after the retries."""


def normalize_server(server: str | None) -> str:
  """``host:port`` or ``http(s)://host:port[/]`` -> ``http(s)://host:port``."""
  text = (server or "").strip().rstrip("/")
  if not text:
    raise FFNError("no DVID server: give --server host:port or set DVID_SERVER")
  if "://" not in text:
    text = "http://" + text
  if not text.startswith(("http://", "https://")):
    raise FFNError(f"DVID server {server!r}: expected host:port or http(s)://host:port")
  return text


def _first_line(text: str) -> str:
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return lines[0] if lines else ""


class DvidClient:
  """Requests to one DVID server. ``timeout_s``: read timeout of one request (seconds);
  ``retries``: further attempts of a repeatable request; ``backoff_s``: first wait between
  attempts (doubled each time, at most 30 s)."""

  def __init__(self, server: str, user: str | None = None, app: str = DEFAULT_APP,
               timeout_s: float = 120.0, retries: int = 4, backoff_s: float = 0.5):
    self.server = normalize_server(server)
    self.user = user or getpass.getuser()
    self.app = app
    self.timeout = (min(CONNECT_TIMEOUT_S, timeout_s), timeout_s)
    self.retries = max(0, int(retries))
    self.backoff_s = backoff_s
    self.session = requests.Session()
    self.session.params = {"u": self.user, "app": self.app}  # type: ignore[assignment]

  def close(self) -> None:
    self.session.close()

  # ------------------------------------------------------------------------------ transport

  def request(self, method: str, path: str, *, params: dict[str, str] | None = None,
              body: Any = None, data: bytes | None = None, repeatable: bool = True,
              allow_404: bool = False) -> requests.Response | None:
    """``method`` on ``<server>/api/<path>``; ``body``: JSON (also for GETs, as DVID's batch
    queries expect), ``data``: raw bytes. Returns the response (None for a 404 when
    ``allow_404``); raises :class:`DvidError` / :class:`DvidUnreachable`."""
    url = f"{self.server}/api/{path}"
    headers = {}
    if body is not None:
      data = json.dumps(body).encode()
      headers["Content-Type"] = "application/json"
    elif data is not None:
      headers["Content-Type"] = "application/octet-stream"
    attempts = 1 + (self.retries if repeatable else 0)
    where = f"DVID {self.server}: {method} /api/{path}"
    attempt = 0  # failed tries so far
    while True:
      last = attempt == attempts - 1
      try:
        response = self.session.request(method, url, params=params, data=data, headers=headers,
                                        timeout=self.timeout)
      except (requests.ConnectionError, requests.Timeout) as e:
        if last:
          tries = f" after {attempts} tries" if attempts > 1 else ""
          raise DvidUnreachable(f"{where}: no answer{tries} ({type(e).__name__}: "
                                f"{_first_line(str(e))[:160]})") from None
        self._wait(attempt, f"{type(e).__name__}")
        attempt += 1
        continue
      if response.status_code >= 500 and not last:
        self._wait(attempt, f"HTTP {response.status_code}")
        attempt += 1
        continue
      if response.status_code == 404 and allow_404:
        return None
      if response.status_code >= 400:
        text = _first_line(response.text)
        own_path = f" (/api/{path})."
        shown = text[:-len(own_path)] if text.endswith(own_path) else text  # DVID repeats it
        tries = f" (after {attempts} tries)" if response.status_code >= 500 and attempts > 1 else ""
        raise DvidError(f"{where}: HTTP {response.status_code}: {shown or response.reason}{tries}",
                        response.status_code, text)
      return response

  def _wait(self, attempt: int, why: str) -> None:
    delay = min(30.0, self.backoff_s * 2 ** attempt)
    _log.warning("DVID %s: %s; retrying in %.1f s", self.server, why, delay)
    time.sleep(delay)

  def get_json(self, path: str, **kwargs: Any) -> Any:
    response = self.request("GET", path, **kwargs)
    return None if response is None else self._json(response, path)

  def post_json(self, path: str, **kwargs: Any) -> Any:
    response = self.request("POST", path, **kwargs)
    return None if response is None else self._json(response, path)

  def _json(self, response: requests.Response, path: str) -> Any:
    try:
      return response.json()
    except ValueError:
      raise DvidError(f"DVID {self.server}: /api/{path}: the answer is not JSON "
                      f"({_first_line(response.text)[:80]!r}); is this a DVID server?") from None

  # -------------------------------------------------------------------------- server, repos

  def server_info(self) -> dict[str, Any]:
    return self.get_json("server/info")

  def create_repo(self, alias: str, description: str = "") -> str:
    """A new repo; returns its root UUID."""
    return self.post_json("repos", body={"alias": alias, "description": description},
                          repeatable=False)["root"]

  def repo_info(self, uuid: str) -> dict[str, Any]:
    return self.get_json(f"repo/{uuid}/info")

  def full_uuid(self, uuid: str) -> str:
    """The node's full UUID (``uuid`` may be a unique prefix)."""
    nodes = self.repo_info(uuid)["DAG"]["Nodes"]
    matches = [u for u in nodes if u.startswith(uuid)]
    if len(matches) != 1:
      raise DvidError(f"DVID {self.server}: node {uuid!r} matches {len(matches)} nodes of its repo")
    return matches[0]

  def node_locked(self, uuid: str) -> bool:
    """Whether the node is committed (locked: DVID accepts no more changes there)."""
    return bool(self.get_json(f"node/{uuid}/commit")["Locked"])

  def commit(self, uuid: str, note: str, log: Sequence[str] = ()) -> str:
    return self.post_json(f"node/{uuid}/commit", body={"note": note, "log": list(log)},
                          repeatable=False)["committed"]

  def newversion(self, uuid: str, note: str) -> str:
    """A child of the committed node ``uuid``; returns the child's UUID."""
    return self.post_json(f"node/{uuid}/newversion", body={"note": note},
                          repeatable=False)["child"]

  # ------------------------------------------------------------------------------ instances

  def create_labelmap(self, uuid: str, instance: str, block_size: int = 64,
                      voxel_size: Sequence[float] = (8.0, 8.0, 8.0),
                      voxel_units: str = "nanometers", max_downres_level: int = 0) -> None:
    """A new ``labelmap`` instance with cubic blocks of ``block_size`` voxels (a multiple of 16)."""
    self.post_json(f"repo/{uuid}/instance", body={
        "typename": "labelmap", "dataname": instance,
        "BlockSize": ",".join([str(int(block_size))] * 3),
        "VoxelSize": ",".join(f"{float(v):g}" for v in voxel_size), "VoxelUnits": voxel_units,
        "IndexedLabels": "true", "MaxDownresLevel": str(int(max_downres_level))},
        repeatable=False)

  def instance_info(self, uuid: str, instance: str) -> dict[str, Any]:
    return self.get_json(f"node/{uuid}/{instance}/info")

  def labelmap_info(self, uuid: str, instance: str) -> dict[str, Any]:
    """The instance's info; FFNError unless it is a ``labelmap``."""
    info = self.instance_info(uuid, instance)
    typename = info.get("Base", {}).get("TypeName")
    if typename != "labelmap":
      raise FFNError(f"DVID {self.server}: instance {instance!r} at node {uuid} is a "
                     f"{typename!r} instance, not a labelmap")
    return info

  # ------------------------------------------------------------------------------- voxels

  def post_raw(self, uuid: str, instance: str, corner_xyz: Sequence[int],
               labels_zyx: np.ndarray) -> None:
    """Writes ``labels_zyx`` (block-aligned corner and shape) as supervoxels, uint64 LE."""
    size = "_".join(str(n) for n in labels_zyx.shape[::-1])
    offset = "_".join(str(int(c)) for c in corner_xyz)
    data = np.ascontiguousarray(labels_zyx, dtype="<u8").tobytes()
    self.request("POST", f"node/{uuid}/{instance}/raw/0_1_2/{size}/{offset}", data=data)

  def get_raw(self, uuid: str, instance: str, corner_xyz: Sequence[int],
              shape_zyx: Sequence[int], supervoxels: bool = True) -> np.ndarray:
    """The labels (supervoxels, or bodies when ``supervoxels`` is False) of a box, z,y,x."""
    size = "_".join(str(int(n)) for n in list(shape_zyx)[::-1])
    offset = "_".join(str(int(c)) for c in corner_xyz)
    response = self.request("GET", f"node/{uuid}/{instance}/raw/0_1_2/{size}/{offset}",
                            params={"supervoxels": str(supervoxels).lower()})
    assert response is not None
    return np.frombuffer(response.content, dtype="<u8").reshape(tuple(shape_zyx)).astype(np.uint64)

  # ------------------------------------------------------------------------------ labels

  def labels_at(self, uuid: str, instance: str, points_xyz: Sequence[Sequence[int]],
                supervoxels: bool = False) -> list[int]:
    """Label at each point (x,y,z voxels)."""
    return self.get_json(f"node/{uuid}/{instance}/labels",
                         params={"supervoxels": str(supervoxels).lower()},
                         body=[[int(v) for v in p] for p in points_xyz])

  def mapping(self, uuid: str, instance: str, supervoxels: Sequence[int]) -> list[int]:
    """The body of each supervoxel; 0 for a supervoxel the label index does not know."""
    return self.get_json(f"node/{uuid}/{instance}/mapping", body=[int(s) for s in supervoxels])

  def sizes(self, uuid: str, instance: str, labels: Sequence[int],
            supervoxels: bool = False) -> list[int]:
    """Voxels of each body (or supervoxel); 0 for a label that does not exist."""
    return self.get_json(f"node/{uuid}/{instance}/sizes",
                         params={"supervoxels": str(supervoxels).lower()},
                         body=[int(v) for v in labels])

  def size(self, uuid: str, instance: str, label: int, supervoxels: bool = False) -> int | None:
    """Voxels of one body (or supervoxel); None when it does not exist (DVID's 404)."""
    answer = self.get_json(f"node/{uuid}/{instance}/size/{int(label)}",
                           params={"supervoxels": str(supervoxels).lower()}, allow_404=True)
    return None if answer is None else int(answer["voxels"])

  def supervoxels(self, uuid: str, instance: str, body: int) -> list[int] | None:
    """The supervoxels of a body; None when it does not exist (DVID's 404)."""
    return self.get_json(f"node/{uuid}/{instance}/supervoxels/{int(body)}", allow_404=True)

  def merge(self, uuid: str, instance: str, target: int, others: Sequence[int]) -> int:
    """Merges the bodies ``others`` into ``target``; returns DVID's MutationID. Never repeated
    on its own (see the module docstring)."""
    answer = self.post_json(f"node/{uuid}/{instance}/merge",
                            body=[int(target)] + [int(o) for o in others], repeatable=False)
    return int(answer["MutationID"])

  def mutations(self, uuid: str, instance: str) -> list[dict[str, Any]]:
    """The node's completed mutations of the instance (merge records: Target, Labels,
    MutationID, User, App...)."""
    return self.get_json(f"node/{uuid}/{instance}/mutations") or []
