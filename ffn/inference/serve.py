"""``ffn serve``: serve a folder over HTTP with CORS headers, for Neuroglancer.

Neuroglancer (e.g. a hosted copy, or one built locally) reads *precomputed* layers over HTTP from
the browser, which needs ``Access-Control-Allow-Origin`` on every response; Python's plain
``http.server`` does not send it. After ``ffn export --format precomputed --output view/``::

  ffn serve view/            # prints a Neuroglancer link that opens every layer of view/

The link opens the public Neuroglancer client (``NEUROGLANCER_CLIENT``) with one layer per
sub-folder that holds a precomputed ``info`` file; the data itself only travels from this server to
the browser (over an SSH tunnel such as ``ssh -L 8000:localhost:8000 <cluster node>`` when the
folder is on a cluster).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os

import json
import urllib.parse

from ffn.errors import FFNError

NEUROGLANCER_CLIENT = "https://neuroglancer-demo.appspot.com/"


class CORSRequestHandler(http.server.SimpleHTTPRequestHandler):
  """Static files with ``Access-Control-Allow-Origin: *``."""

  def end_headers(self) -> None:
    self.send_header("Access-Control-Allow-Origin", "*")
    super().end_headers()


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


def neuroglancer_url(base_url: str, layers: list[tuple[str, str]]) -> str:
  """A Neuroglancer link showing ``layers`` (name, type) served under ``base_url``."""
  state = {"layers": [{"type": kind, "source": f"precomputed://{base_url.rstrip('/')}/{name}",
                       "name": name} for name, kind in layers],
           "layout": "4panel"}
  fragment = urllib.parse.quote(json.dumps(state, separators=(",", ":")), safe="")
  return f"{NEUROGLANCER_CLIENT}#!{fragment}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("directory", help="folder to serve (e.g. an ffn export --format precomputed output)")
  parser.add_argument("--port", type=int, default=8000)
  parser.add_argument("--bind", default="127.0.0.1", help="address to listen on (default: local only)")


def run(args: argparse.Namespace) -> int:
  if not os.path.isdir(args.directory):
    raise FFNError(f"{args.directory}: not a directory")
  handler = functools.partial(CORSRequestHandler, directory=args.directory)
  try:
    server = http.server.ThreadingHTTPServer((args.bind, args.port), handler)
  except OSError as e:
    raise FFNError(f"cannot listen on {args.bind}:{args.port} ({e.strerror or e}); "
                   "choose another --port") from None
  with server:
    base = f"http://{'localhost' if args.bind in ('127.0.0.1', '0.0.0.0') else args.bind}:{args.port}"
    print(f"serving {os.path.abspath(args.directory)} at {base}/ (Ctrl-C stops)")
    layers = precomputed_layers(args.directory)
    if layers:
      print(f"open in Neuroglancer: {neuroglancer_url(base, layers)}", flush=True)
    server.serve_forever()
  return 0
