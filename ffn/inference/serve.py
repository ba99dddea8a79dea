"""``ffn serve``: serve a folder over HTTP with CORS headers, for Neuroglancer.

Neuroglancer (e.g. a hosted copy, or one built locally) reads *precomputed* layers over HTTP from
the browser, which needs ``Access-Control-Allow-Origin`` on every response; Python's plain
``http.server`` does not send it. After ``ffn export --format precomputed --output view/``::

  ffn serve view/            # then, in Neuroglancer: precomputed://http://localhost:8000/segmentation
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os

from ffn.errors import FFNError


class CORSRequestHandler(http.server.SimpleHTTPRequestHandler):
  """Static files with ``Access-Control-Allow-Origin: *``."""

  def end_headers(self) -> None:
    self.send_header("Access-Control-Allow-Origin", "*")
    super().end_headers()


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("directory", help="folder to serve (e.g. an ffn export --format precomputed output)")
  parser.add_argument("--port", type=int, default=8000)
  parser.add_argument("--bind", default="127.0.0.1", help="address to listen on (default: local only)")


def run(args: argparse.Namespace) -> int:
  if not os.path.isdir(args.directory):
    raise FFNError(f"{args.directory}: not a directory")
  handler = functools.partial(CORSRequestHandler, directory=args.directory)
  with http.server.ThreadingHTTPServer((args.bind, args.port), handler) as server:
    print(f"serving {os.path.abspath(args.directory)} at http://{args.bind}:{args.port}/ (Ctrl-C stops)")
    server.serve_forever()
  return 0
