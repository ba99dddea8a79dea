"""``ffn serve``: serve a folder over HTTP with CORS headers, for Neuroglancer.

Neuroglancer (e.g. a hosted copy, or one built locally) reads *precomputed* layers over HTTP from
the browser, which needs ``Access-Control-Allow-Origin`` on every response; Python's plain
``http.server`` does not send it. After ``ffn export --format precomputed --output view/``::

  ffn serve view/            # prints a Neuroglancer link that opens every layer of view/

The link opens the public Neuroglancer client (``NEUROGLANCER_CLIENT``) with one layer per
sub-folder that holds a precomputed ``info`` file; the data itself only travels from this server to
the browser (over an SSH tunnel such as ``ssh -L 8000:localhost:8000 <cluster node>`` when the
folder is on a cluster).

Without internet access, ``ffn serve view/ --client local`` also serves the viewer itself: the
client bundled in the ``neuroglancer`` Python package (``pip install neuroglancer``). That build is
Neuroglancer's Python-integrated client, which loads its state from the Python server that hosts
it, so this command runs that server on ``--client_port`` (default ``--port`` + 1, also bound to
``--bind``) with the same layers and prints its ``/v/<token>/`` link; tunnel both ports when the
folder is on a cluster.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import io
import json
import os
import sys
import urllib.parse

from ffn.errors import FFNError

NEUROGLANCER_CLIENT = "https://neuroglancer-demo.appspot.com/"


class CORSRequestHandler(http.server.SimpleHTTPRequestHandler):
  """Static files with ``Access-Control-Allow-Origin: *`` and single byte ranges (``Range: bytes=a-b``,
  ``bytes=a-``, ``bytes=-n`` -> 206 with ``Content-Range``; unsatisfiable -> 416): Neuroglancer reads
  a *sharded* precomputed layer by fetching the shard index and then each minishard and chunk as
  byte ranges of one shard file, which Python's ``http.server`` alone answers with the whole file."""

  def end_headers(self) -> None:
    self.send_header("Access-Control-Allow-Origin", "*")
    self.send_header("Access-Control-Expose-Headers", "Content-Range, Content-Length, Accept-Ranges")
    super().end_headers()

  def do_OPTIONS(self) -> None:  # CORS preflight (a Range header may trigger one)
    self.send_response(204)
    self.send_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
    self.send_header("Access-Control-Allow-Headers", "Range")
    self.send_header("Content-Length", "0")
    self.end_headers()

  def _byte_range(self, size: int) -> tuple[int, int] | None | str:
    """(first, last) inclusive of a valid single range, None without one, "bad" if unsatisfiable."""
    header = self.headers.get("Range")
    if not header or not header.startswith("bytes=") or "," in header:
      return None
    first, _, last = header[len("bytes="):].strip().partition("-")
    try:
      if first == "":
        n = int(last)
        return (max(size - n, 0), size - 1) if n > 0 and size else "bad"
      a = int(first)
      b = int(last) if last else size - 1
    except ValueError:
      return None
    if a >= size or b < a:
      return "bad"
    return a, min(b, size - 1)

  def send_head(self):
    path = self.translate_path(self.path)
    if "Range" not in self.headers or not os.path.isfile(path):
      return super().send_head()
    try:
      f = open(path, "rb")
    except OSError:
      self.send_error(404, "File not found")
      return None
    size = os.fstat(f.fileno()).st_size
    span = self._byte_range(size)
    if span is None:
      f.close()
      return super().send_head()
    if span == "bad":
      f.close()
      self.send_response(416)
      self.send_header("Content-Range", f"bytes */{size}")
      self.send_header("Content-Length", "0")
      self.end_headers()
      return None
    first, last = span
    self.send_response(206)
    self.send_header("Content-Type", self.guess_type(path))
    self.send_header("Accept-Ranges", "bytes")
    self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
    self.send_header("Content-Length", str(last - first + 1))
    self.end_headers()
    with f:
      f.seek(first)
      return io.BytesIO(f.read(last - first + 1))  # copied out by do_GET, not sent by do_HEAD


def precomputed_layers(directory: str) -> list[tuple[str, str]]:
  """(name, type) of the precomputed layers in ``directory``: sub-folders with an ``info`` file,
  images first, in name order."""
  layers = []
  for name in sorted(os.listdir(directory)):
    info = os.path.join(directory, name, "info")
    if os.path.isfile(info):
      try:
        with open(info, encoding="utf-8") as f:
          kind = json.load(f).get("type", "image")
      except (OSError, ValueError) as e:
        raise FFNError(f"{info}: unreadable precomputed info ({e})") from None
      layers.append((name, kind))
  return sorted(layers, key=lambda layer: (layer[1] != "image", layer[0]))


def layer_state(base_url: str, layers: list[tuple[str, str]]) -> dict:
  """Neuroglancer viewer state (JSON) showing ``layers`` (name, type) served under ``base_url``,
  in the 4-panel layout (xy, xz, 3D, yz)."""
  return {"layers": [{"type": kind, "source": f"precomputed://{base_url.rstrip('/')}/{name}",
                      "name": name} for name, kind in layers],
          "layout": "4panel"}


def neuroglancer_url(base_url: str, layers: list[tuple[str, str]]) -> str:
  """A link to the public Neuroglancer client showing ``layers`` (name, type) served under
  ``base_url``."""
  state = layer_state(base_url, layers)
  fragment = urllib.parse.quote(json.dumps(state, separators=(",", ":")), safe="")
  return f"{NEUROGLANCER_CLIENT}#!{fragment}"


def start_local_client(state: dict, bind: str, port: int) -> tuple[object, str]:
  """Starts Neuroglancer's Python server (a background thread) hosting the bundled client with
  ``state``; returns the viewer and its link. The caller must keep the viewer referenced while it
  serves: Neuroglancer's server holds viewers weakly, and a collected one answers 404."""
  try:
    import neuroglancer
  except ImportError:
    raise FFNError("--client local needs the neuroglancer Python package "
                   "(pip install neuroglancer)") from None
  neuroglancer.set_server_bind_address(bind, port)
  try:
    viewer = neuroglancer.Viewer()  # starts the server
    viewer.set_state(state)
    return viewer, viewer.get_viewer_url()
  except OSError as e:
    raise FFNError(f"--client local: cannot listen on {bind}:{port} ({e.strerror or e}); "
                   "choose another --client_port") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("directory", help="folder to serve (e.g. an ffn export --format precomputed output)")
  parser.add_argument("--port", type=int, default=8000, help="TCP port of the data (0: any free port)")
  parser.add_argument("--bind", default="127.0.0.1", help="address to listen on (default: local only)")
  parser.add_argument("--client", choices=("public", "local"), default="public",
                      help=f"viewer the printed link opens: public ({NEUROGLANCER_CLIENT}, needs "
                           "internet) or local (the client bundled in the neuroglancer Python "
                           "package, served by this command; works offline)")
  parser.add_argument("--client_port", type=int, default=None,
                      help="TCP port of the local client (default: --port + 1; 0: any free port)")


def run(args: argparse.Namespace) -> int:
  if not os.path.isdir(args.directory):
    raise FFNError(f"{args.directory}: not a directory")
  layers = precomputed_layers(args.directory)
  handler = functools.partial(CORSRequestHandler, directory=args.directory)
  try:
    server = http.server.ThreadingHTTPServer((args.bind, args.port), handler)
  except OSError as e:
    raise FFNError(f"cannot listen on {args.bind}:{args.port} ({e.strerror or e}); "
                   "choose another --port") from None
  with server:
    port = server.server_address[1]
    base = f"http://{'localhost' if args.bind in ('127.0.0.1', '0.0.0.0') else args.bind}:{port}"
    link, viewer = None, None
    if layers and args.client == "local":
      client_port = args.client_port if args.client_port is not None else (port + 1 if args.port else 0)
      viewer, url = start_local_client(layer_state(base, layers), args.bind, client_port)
      link = f"open in Neuroglancer (local client): {url}"
    elif layers:
      link = f"open in Neuroglancer: {neuroglancer_url(base, layers)}"
    print(f"serving {os.path.abspath(args.directory)} at {base}/ (Ctrl-C stops)")
    if link:
      print(link)
    sys.stdout.flush()
    server.serve_forever()
  del viewer  # referenced until here, so the local client's link keeps answering
  return 0
