"""A stand-in for a DVID server in tests: NOT DVID, a small Python HTTP server that follows DVID's
documented semantics for the endpoints :mod:`ffn.dvid` uses.

DVID itself cannot run here (it is on no package registry and its Go build needs modules that are
not reachable), so the tests talk HTTP to this server instead, on 127.0.0.1 and a free port, one
thread per request. What it follows (janelia-flyem/dvid: ``server/web.go``,
``datatype/labelmap/labelmap.go`` help text and ``handlers.go``, ``mutate.go``):

* repos and nodes: ``POST /api/repos`` -> ``{"root": uuid}``; ``GET /api/repo/<uuid>/info`` (DAG
  nodes with ``Locked``, ``DataInstances`` with ``Base.TypeName``); UUIDs may be unique prefixes
  (else 400 ``Could not find UUID with partial match to X!``); ``GET/POST
  /api/node/<uuid>/commit`` (``{"Locked": ..}``, ``{"committed": uuid}``; committing a locked node
  is 400); ``POST /api/node/<uuid>/newversion`` (only from a committed node without a child on
  its branch) -> ``{"child": ..}``, the child starting from the parent's data; every POST that
  changes an instance of a locked node is 400 ``Cannot do POST on endpoint "merge" of locked
  node <uuid>``;
* ``POST /api/repo/<uuid>/instance`` (typenames ``labelmap`` and ``keyvalue``; an unknown instance
  name is 400 ``invalid data instance name``); ``GET .../<instance>/info``;
* labelmap voxels: ``POST raw/0_1_2/<size>/<offset>`` (block-aligned, uint64 little-endian, z,y,x,
  x fastest; otherwise 400, nothing stored), ``GET raw/...`` (``supervoxels=true``: unmapped);
  ``GET label/<x_y_z>``, ``GET labels`` (JSON points in the GET body) read the voxels at once;
* the label index is asynchronous: a raw POST's blocks are indexed ``index_delay_s`` seconds
  later. Until then ``GET mapping`` (JSON supervoxels in the GET body) answers 0 for their
  supervoxels (unknown), ``GET sizes`` 0 and ``GET size/<label>`` / ``supervoxels/<label>`` 404;
* ``POST merge`` ``[target, a, b, ...]`` -> ``{"MutationID": n}``: 400 and nothing applied for
  fewer than two labels, a 0 among the merged labels, a target or merged label that does not exist
  (never indexed, or merged away); merged-away bodies then answer 404 (size, supervoxels) and 0
  (sizes), their supervoxels map to the target;
* ``GET mutations``: the node's merges (Action, Target, Labels, UUID, MutationID, Timestamp, User
  and App from the ``u=``/``app=`` query parameters);
* errors are DVID's: status 400, a plain-text line ``<message> (<path>).``.

Test hooks (attributes of :class:`StandinDvid`): ``fail_next`` = (n, status): the next n requests
answer that status and do nothing; ``drop_next`` = n: the next n requests get no answer (the
connection closes), nothing done; ``merge_faults``: a list, each merge takes the first entry:
``"503"`` answers 503 and applies nothing, ``"lost"`` applies it and closes the connection
without an answer; ``hold_merge_after`` = k: the merge after the k-th applied merge
waits (``merge_held`` is set) until ``release_merge`` is set, then is applied when
``apply_held_merge`` (the client may be gone by then, as with a real server). ``snapshot()`` is
the whole state, comparable with ``==``; ``index_now()`` ends the indexing delay; ``log`` lists
(method, path) of every request.
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
import time
import urllib.parse
import uuid as uuidlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np


class BadRequest(Exception):
  """DVID's 400 with a plain-text message."""


class NotFound(Exception):
  """DVID's 404 (no body)."""


class Labelmap:
  """One labelmap instance at one node."""

  def __init__(self, block_size: int, voxel_size: list[float], units: str):
    self.block_size = block_size
    self.voxel_size = voxel_size
    self.units = units
    self.blocks: dict[tuple[int, int, int], np.ndarray] = {}  # (bx, by, bz) -> z,y,x uint64
    self.indexed: dict[tuple[int, int, int], dict[int, int]] = {}  # block -> {sv: voxels}
    self.sv_size: dict[int, int] = {}  # supervoxel -> voxels, as the label index knows it
    self.sv_body: dict[int, int] = {}  # supervoxel -> body, for merged supervoxels only
    self.body_svs: dict[int, set[int]] = {}  # merged body -> its supervoxels
    self.pending: list[tuple[float, tuple[int, int, int], dict[int, int]]] = []
    self.mutations: list[dict[str, Any]] = []
    self.max_label = 0
    self.extents: tuple[list[int], list[int]] | None = None

  def apply_due(self, now: float) -> None:
    """Indexes the blocks whose indexing time has come."""
    due = [p for p in self.pending if p[0] <= now]
    self.pending = [p for p in self.pending if p[0] > now]
    for _, block, counts in due:
      for sv, n in self.indexed.pop(block, {}).items():
        self.sv_size[sv] -= n
        if not self.sv_size[sv]:
          del self.sv_size[sv]
      self.indexed[block] = counts
      for sv, n in counts.items():
        self.sv_size[sv] = self.sv_size.get(sv, 0) + n

  def body_of(self, sv: int) -> int:
    """Mapped label of an indexed supervoxel, 0 when the index does not know it."""
    if sv not in self.sv_size:
      return 0
    return self.sv_body.get(sv, sv)

  def exists(self, label: int) -> bool:
    return label in self.body_svs or (label in self.sv_size and label not in self.sv_body)

  def svs_of(self, body: int) -> set[int]:
    if body in self.body_svs:
      return set(self.body_svs[body])
    return {body} if self.exists(body) else set()

  def body_size(self, body: int) -> int:
    return sum(self.sv_size.get(sv, 0) for sv in self.svs_of(body))

  def voxels(self, corner_xyz: list[int], size_xyz: list[int], mapped: bool) -> np.ndarray:
    b = self.block_size
    out = np.zeros(size_xyz[::-1], np.uint64)
    lo = [c // b for c in corner_xyz]
    hi = [-(-(c + s) // b) for c, s in zip(corner_xyz, size_xyz)]
    for bz in range(lo[2], hi[2]):
      for by in range(lo[1], hi[1]):
        for bx in range(lo[0], hi[0]):
          block = self.blocks.get((bx, by, bz))
          if block is None:
            continue
          start = [bx * b, by * b, bz * b]
          s_lo = [max(st, c) for st, c in zip(start, corner_xyz)]
          s_hi = [min(st + b, c + s) for st, c, s in zip(start, corner_xyz, size_xyz)]
          pairs = list(zip(s_lo[::-1], s_hi[::-1]))
          src = tuple(slice(l - st, h - st) for (l, h), st in zip(pairs, start[::-1]))
          dst = tuple(slice(l - c, h - c) for (l, h), c in zip(pairs, corner_xyz[::-1]))
          out[dst] = block[src]
    if mapped and self.sv_body:
      keys = np.array(sorted(self.sv_body), np.uint64)
      values = np.array([self.sv_body[int(k)] for k in keys], np.uint64)
      where = np.searchsorted(keys, out)
      hit = (where < len(keys)) & (keys[np.minimum(where, len(keys) - 1)] == out)
      out[hit] = values[where[hit]]
    return out


class StandinDvid:
  """The stand-in server (see the module docstring). Use as a context manager or call
  :meth:`stop`; ``url`` is ``http://127.0.0.1:<port>``."""

  def __init__(self, index_delay_s: float = 0.3):
    self.index_delay_s = index_delay_s
    self.lock = threading.RLock()
    self.repos: dict[str, dict[str, Any]] = {}  # root uuid -> {alias, instances: {name: type}}
    self.nodes: dict[str, dict[str, Any]] = {}  # uuid -> {repo, parent, children, locked, vid}
    self.data: dict[tuple[str, str], Any] = {}  # (instance, node uuid) -> Labelmap | dict
    self.instance_params: dict[tuple[str, str], dict[str, Any]] = {}  # (repo, name) -> params
    self.next_mutation = 1
    self.merges_applied = 0
    self.log: list[tuple[str, str]] = []
    self.fail_next: tuple[int, int] = (0, 503)
    self.drop_next = 0
    self.merge_faults: list[str] = []
    self.hold_merge_after: int | None = None
    self.merge_held = threading.Event()
    self.release_merge = threading.Event()
    self.apply_held_merge = True
    self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
    self._httpd.daemon_threads = True
    self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
    self._thread = threading.Thread(target=self._httpd.serve_forever, name="dvid-standin",
                                    daemon=True)
    self._thread.start()

  def stop(self) -> None:
    self.release_merge.set()
    self._httpd.shutdown()
    self._httpd.server_close()

  def __enter__(self) -> "StandinDvid":
    return self

  def __exit__(self, *exc) -> None:
    self.stop()

  # ------------------------------------------------------------------------------ helpers

  def new_repo(self, alias: str = "") -> str:
    with self.lock:
      root = uuidlib.uuid4().hex
      self.repos[root] = {"alias": alias, "instances": {}, "created": time.time()}
      self.nodes[root] = {"repo": root, "parent": None, "children": [], "locked": False,
                          "vid": len(self.nodes) + 1, "note": ""}
      return root

  def match(self, text: str) -> str:
    found = [u for u in self.nodes if u.startswith(text)] if text else []
    if len(found) > 1:
      raise BadRequest(f"More than one UUID matches {text}!")
    if not found:
      raise BadRequest(f"Could not find UUID with partial match to {text}!")
    return found[0]

  def state(self, name: str, node: str) -> Any:
    """The instance's data at a node (a child starts from a copy of its parent's)."""
    key = (name, node)
    if key not in self.data:
      parent = self.nodes[node]["parent"]
      repo = self.nodes[node]["repo"]
      if parent is not None:
        self.data[key] = copy.deepcopy(self.state(name, parent))
      else:
        params = self.instance_params[(repo, name)]
        self.data[key] = (Labelmap(params["block"], params["voxel"], params["units"])
                          if params["type"] == "labelmap" else {})
    return self.data[key]

  def labelmap_at(self, node: str, name: str) -> Labelmap:
    state = self.state(name, node)
    state.apply_due(time.time())
    return state

  def index_now(self) -> None:
    """Indexes every pending block at once (as if the indexing delay had passed)."""
    with self.lock:
      for state in self.data.values():
        if isinstance(state, Labelmap):
          state.apply_due(float("inf"))

  def snapshot(self) -> dict[str, Any]:
    """Everything the server holds, as plain comparable values."""
    with self.lock:
      out: dict[str, Any] = {"nodes": {u: (n["locked"], n["parent"], tuple(n["children"]))
                                       for u, n in self.nodes.items()},
                             "repos": {r: dict(v["instances"]) for r, v in self.repos.items()},
                             "next_mutation": self.next_mutation, "data": {}}
      for key, state in self.data.items():
        if isinstance(state, Labelmap):
          digest = hashlib.sha1()
          for block in sorted(state.blocks):
            digest.update(repr(block).encode())
            digest.update(state.blocks[block].tobytes())
          out["data"][key] = {"voxels": digest.hexdigest(), "sv_size": dict(state.sv_size),
                              "pending": len(state.pending), "sv_body": dict(state.sv_body),
                              "mutations": json.dumps(state.mutations)}
        else:
          out["data"][key] = json.dumps(state)
      return out


def _handler_for(dvid: StandinDvid) -> type[BaseHTTPRequestHandler]:

  class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
      return

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
      self._serve("GET")

    def do_POST(self) -> None:  # noqa: N802
      self._serve("POST")

    def do_HEAD(self) -> None:  # noqa: N802
      self._serve("HEAD")

    def _serve(self, method: str) -> None:
      url = urllib.parse.urlsplit(self.path)
      query = dict(urllib.parse.parse_qsl(url.query))
      length = int(self.headers.get("Content-Length") or 0)
      body = self.rfile.read(length) if length else b""
      with dvid.lock:
        dvid.log.append((method, url.path))
        fail_n, fail_status = dvid.fail_next
        if fail_n:
          dvid.fail_next = (fail_n - 1, fail_status)
          self._send(fail_status, b"stand-in: injected failure\n", "text/plain")
          return
        if dvid.drop_next:
          dvid.drop_next -= 1
          self.close_connection = True
          return
      try:
        status, payload = route(dvid, method, url.path, query, body)
      except BadRequest as e:
        self._send(400, f"{e} ({url.path}).\n".encode(), "text/plain")
        return
      except NotFound:
        self._send(404, b"", "text/plain")
        return
      if status is None:  # no answer: the connection closes (the client may be gone already)
        self.close_connection = True
        return
      if isinstance(payload, (bytes, bytearray)):
        self._send(status, bytes(payload), "application/octet-stream")
      else:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(self, status: int, data: bytes, content_type: str) -> None:
      try:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
      except (BrokenPipeError, ConnectionResetError):
        self.close_connection = True

  return Handler


def _json(body: bytes, what: str) -> Any:
  try:
    return json.loads(body.decode() or "null")
  except ValueError as e:
    raise BadRequest(f"Bad {what} request JSON: {e}") from None


def _ints(value: Any, what: str) -> list[int]:
  if not isinstance(value, list) or not all(isinstance(v, int) and v >= 0 for v in value):
    raise BadRequest(f"Bad {what} request JSON: expected a list of uint64")
  return value


def _point(text: str) -> list[int]:
  try:
    values = [int(v) for v in text.split("_")]
  except ValueError:
    raise BadRequest(f"bad coordinate {text!r}") from None
  if len(values) != 3:
    raise BadRequest(f"expected a 3d coordinate, got {text!r}")
  return values


def route(dvid: StandinDvid, method: str, path: str, query: dict[str, str],
          body: bytes) -> tuple[int | None, Any]:
  """(status, JSON value or bytes) of one request; raises BadRequest / NotFound."""
  parts = [p for p in path.split("/") if p]
  if len(parts) < 2 or parts[0] != "api":
    raise NotFound()
  with dvid.lock:
    if parts[1:] == ["server", "info"]:
      return 200, {"Server": "ffn tests/dvid_standin.py (a stand-in, not DVID)",
                   "DVID Version": "stand-in", "Cores": "1"}
    if parts[1:] == ["repos"] and method == "POST":
      config = _json(body, "repos") or {}
      return 200, {"root": dvid.new_repo(str(config.get("alias", "")))}
    if parts[1] == "repo" and len(parts) == 4:
      node = dvid.match(parts[2])
      repo = dvid.nodes[node]["repo"]
      if parts[3] == "info" and method == "GET":
        return 200, _repo_info(dvid, repo)
      if parts[3] == "instance" and method == "POST":
        return 200, _new_instance(dvid, node, repo, _json(body, "instance") or {})
    if parts[1] == "node" and len(parts) == 4 and parts[3] in ("commit", "status", "newversion"):
      node = dvid.match(parts[2])
      info = dvid.nodes[node]
      if parts[3] in ("commit", "status") and method == "GET":
        return 200, {"Locked": info["locked"]}
      if parts[3] == "commit" and method == "POST":
        if info["locked"]:
          raise BadRequest("Could not post to locked node")
        _json(body, "commit")
        info["locked"] = True
        return 200, {"committed": node}
      if parts[3] == "newversion" and method == "POST":
        config = _json(body, "newversion") or {}
        if not info["locked"]:
          raise BadRequest("can't branch an unlocked node")
        if info["children"]:  # newversion stays on the parent's branch, which has its child
          raise BadRequest("branch already exists with given name")
        child = uuidlib.uuid4().hex
        dvid.nodes[child] = {"repo": info["repo"], "parent": node, "children": [],
                             "locked": False, "vid": len(dvid.nodes) + 1,
                             "note": str(config.get("note", ""))}
        info["children"].append(child)
        for name in dvid.repos[info["repo"]]["instances"]:
          dvid.state(name, child)  # the child starts from the parent's data, now
        return 200, {"child": child}
    if parts[1] == "node" and len(parts) >= 5:
      node = dvid.match(parts[2])
      repo = dvid.nodes[node]["repo"]
      name, keyword = parts[3], parts[4]
      typename = dvid.repos[repo]["instances"].get(name)
      if typename is None:
        raise BadRequest("invalid data instance name")
      if method == "POST" and keyword != "info" and dvid.nodes[node]["locked"]:
        raise BadRequest(f'Cannot do POST on endpoint "{keyword}" of locked node {node}')
      if keyword == "info" and method == "GET":
        return 200, _instance_info(dvid, repo, node, name)
      if typename != "labelmap":
        raise BadRequest(f"Bad API call ({path}) for data \"{name}\".  See API help at "
                         f"http://stand-in/api/help/{typename}")
      if keyword != "merge" or method != "POST":
        return _labelmap(dvid, dvid.labelmap_at(node, name), method, parts[5:], query, body,
                         name, path)
    else:
      raise NotFound()
  return _merge(dvid, node, name, body, query)  # outside the lock: a test may hold it


def _repo_info(dvid: StandinDvid, repo: str) -> dict[str, Any]:
  nodes = {u: n for u, n in dvid.nodes.items() if n["repo"] == repo}
  vid = {u: n["vid"] for u, n in nodes.items()}
  return {
      "Root": repo, "Alias": dvid.repos[repo]["alias"], "Description": "",
      "DataInstances": {name: {"Base": {"TypeName": t, "Name": name, "RepoUUID": repo}}
                        for name, t in dvid.repos[repo]["instances"].items()},
      "DAG": {"Root": repo, "Nodes": {u: {
          "UUID": u, "VersionID": n["vid"], "Locked": n["locked"], "Branch": "",
          "Note": n["note"], "Log": [],
          "Parents": [vid[n["parent"]]] if n["parent"] else [],
          "Children": [vid[c] for c in n["children"]]} for u, n in nodes.items()}}}


def _new_instance(dvid: StandinDvid, node: str, repo: str, config: dict[str, Any]) -> dict:
  if dvid.nodes[node]["locked"]:
    raise BadRequest(f"New data instance cannot be created on locked node {node}")
  typename, name = config.get("typename"), config.get("dataname")
  if not typename:
    raise BadRequest("POST on repo endpoint requires specification of valid 'typename'")
  if not name:
    raise BadRequest("POST on repo endpoint requires specification of valid 'dataname'")
  if typename not in ("labelmap", "keyvalue"):
    raise BadRequest(f"no data type {typename!r} in this stand-in (labelmap, keyvalue)")
  if name in dvid.repos[repo]["instances"]:
    raise BadRequest("data name already exists")
  params: dict[str, Any] = {"type": typename, "block": 64, "voxel": [8.0, 8.0, 8.0],
                            "units": "nanometers"}
  if typename == "labelmap":
    sizes = [int(v) for v in str(config.get("BlockSize", "64,64,64")).split(",")]
    if len(set(sizes)) != 1 or sizes[0] % 16:
      raise BadRequest("BlockSize must be multiples of 16 (cubic in this stand-in)")
    params["block"] = sizes[0]
    params["voxel"] = [float(v) for v in str(config.get("VoxelSize", "8,8,8")).split(",")]
    params["units"] = str(config.get("VoxelUnits", "nanometers"))
  dvid.instance_params[(repo, name)] = params
  dvid.repos[repo]["instances"][name] = typename
  return {"result": f"Added {name} [{typename}] to node {node}"}


def _instance_info(dvid: StandinDvid, repo: str, node: str, name: str) -> dict[str, Any]:
  params = dvid.instance_params[(repo, name)]
  base = {"TypeName": params["type"], "Name": name, "RepoUUID": repo, "Versioned": True}
  if params["type"] != "labelmap":
    return {"Base": base, "Extended": {}}
  state = dvid.labelmap_at(node, name)
  lo, hi = state.extents if state.extents else (None, None)
  return {"Base": base,
          "Extended": {"BlockSize": [state.block_size] * 3, "VoxelSize": state.voxel_size,
                       "VoxelUnits": [state.units] * 3, "MinPoint": lo, "MaxPoint": hi,
                       "MaxRepoLabel": state.max_label, "IndexedLabels": True,
                       "MaxDownresLevel": 0},
          "Extents": {"MinPoint": lo, "MaxPoint": hi}}


def _labelmap(dvid: StandinDvid, state: Labelmap, method: str, args: list[str],
              query: dict[str, str], body: bytes, name: str, path: str) -> tuple[int, Any]:
  keyword = path.split("/")[5]
  supervoxels = query.get("supervoxels") == "true"
  if keyword == "raw" and len(args) >= 3:
    if args[0] != "0_1_2":
      raise BadRequest("this stand-in serves only 3d raw data (0_1_2)")
    size, corner = _point(args[1]), _point(args[2])
    if method == "GET":
      return 200, state.voxels(corner, size, mapped=not supervoxels).astype("<u8").tobytes()
    b = state.block_size
    if any(c % b for c in corner) or any(s % b or s <= 0 for s in size):
      raise BadRequest(f"cannot store labels for data {name!r} in non-block aligned geometry "
                       f"{corner} -> {[c + s - 1 for c, s in zip(corner, size)]}")
    expected = int(np.prod(size)) * 8
    if len(body) != expected:
      raise BadRequest(f"labels data was {len(body)} bytes, expected {expected} bytes")
    labels = np.frombuffer(body, "<u8").reshape(size[::-1]).astype(np.uint64)
    due = time.time() + dvid.index_delay_s
    for z in range(0, size[2], b):
      for y in range(0, size[1], b):
        for x in range(0, size[0], b):
          block = labels[z:z + b, y:y + b, x:x + b].copy()
          key = ((corner[0] + x) // b, (corner[1] + y) // b, (corner[2] + z) // b)
          state.blocks[key] = block
          ids, counts = np.unique(block, return_counts=True)
          state.pending.append((due, key, {int(i): int(n) for i, n in zip(ids, counts) if i}))
    state.max_label = max(state.max_label, int(labels.max()))
    hi = [c + s - 1 for c, s in zip(corner, size)]
    if state.extents is None:
      state.extents = (list(corner), hi)
    else:
      state.extents = ([min(a, c) for a, c in zip(state.extents[0], corner)],
                       [max(a, c) for a, c in zip(state.extents[1], hi)])
    state.apply_due(time.time())
    return 200, b""
  if method != "GET":
    raise BadRequest(f"DVID does not accept the {method} action on the {keyword!r} endpoint")
  if keyword == "label" and args:
    x, y, z = _point(args[0])
    return 200, {"Label": int(state.voxels([x, y, z], [1, 1, 1], not supervoxels)[0, 0, 0])}
  if keyword == "labels":
    points = _json(body, "labels")
    if not isinstance(points, list):
      raise BadRequest("Bad labels request JSON: expected a list of [x, y, z]")
    return 200, [int(state.voxels([int(v) for v in p], [1, 1, 1], not supervoxels)[0, 0, 0])
                 for p in points]
  if keyword == "mapping":
    svs = _ints(_json(body, "mapping"), "mapping")
    if query.get("nolookup") == "true":
      return 200, [state.sv_body.get(sv, sv) for sv in svs]
    return 200, [state.body_of(sv) for sv in svs]
  if keyword == "sizes":
    labels = _ints(_json(body, "sizes"), "sizes")
    if supervoxels:
      return 200, [state.sv_size.get(sv, 0) for sv in labels]
    return 200, [state.body_size(label) for label in labels]
  if keyword in ("size", "supervoxels") and args:
    label = int(args[0])
    if label == 0:
      raise BadRequest("Label 0 is protected background value and cannot be queried as body.")
    if keyword == "size":
      voxels = state.sv_size.get(label, 0) if supervoxels else state.body_size(label)
      if not voxels:
        raise NotFound()
      return 200, {"voxels": voxels}
    svs = state.svs_of(label)
    if not svs:
      raise NotFound()
    return 200, sorted(svs)
  if keyword == "mutations":
    return 200, state.mutations
  raise BadRequest(f"Bad API call ({path}) for data \"{name}\".  See API help at "
                   "http://stand-in/api/help/labelmap")


def _merge(dvid: StandinDvid, node: str, name: str, body: bytes,
           query: dict[str, str]) -> tuple[int | None, Any]:
  """POST merge; a held one waits outside the lock, and its answer may reach nobody."""
  held = False
  with dvid.lock:
    fault = dvid.merge_faults.pop(0) if dvid.merge_faults else None
    if fault == "503":
      return 503, {"error": "stand-in: injected merge failure"}
    if dvid.hold_merge_after is not None and dvid.merges_applied >= dvid.hold_merge_after:
      held = True
      dvid.hold_merge_after = None
  if held:
    dvid.merge_held.set()
    dvid.release_merge.wait(60)
    if not dvid.apply_held_merge:
      return None, None
  with dvid.lock:
    state = dvid.labelmap_at(node, name)
    try:
      tuple_ = json.loads(body.decode())
    except ValueError as e:
      raise BadRequest(f"Bad merge op JSON: {e}") from None
    if not isinstance(tuple_, list) or len(tuple_) < 2 or not all(
        isinstance(v, int) and v >= 0 for v in tuple_):
      raise BadRequest(f"invalid merge tuple {tuple_}, need at least target and to-merge labels")
    target, others = tuple_[0], tuple_[1:]
    if 0 in others:
      raise BadRequest(f"invalid merge tuple {tuple_} -- cannot contain background label 0")
    if not state.exists(target):
      raise BadRequest(f"Error on merge: can't merge into a non-existent label {target}")
    for label in others:
      if not state.exists(label):
        raise BadRequest(f"Error on merge: can't merge non-existent label {label}")
    members = state.svs_of(target)
    for label in others:
      for sv in state.svs_of(label):
        members.add(sv)
      state.body_svs.pop(label, None)
    for sv in members:
      if sv == target:
        state.sv_body.pop(sv, None)
      else:
        state.sv_body[sv] = target
    state.body_svs[target] = members
    mutation = dvid.next_mutation
    dvid.next_mutation += 1
    dvid.merges_applied += 1
    state.mutations.append({"Action": "merge", "Target": target, "Labels": list(others),
                            "UUID": node, "MutationID": mutation,
                            "Timestamp": time.strftime("%Y-%m-%d %H:%M:%S +0000 UTC",
                                                       time.gmtime()),
                            "User": query.get("u", ""), "App": query.get("app", "")})
    if fault == "lost":
      return None, None
    return 200, {"MutationID": mutation}
