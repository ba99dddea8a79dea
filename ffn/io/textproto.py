"""Protobuf text-format (pbtxt) messages from a file or from the text itself, with one-line errors.

google/ffn's request flags (``--inference_request``, ``--consensus_request``) take either a path
to a ``.pbtxt`` file or the text of the message; both are handled here.
"""

from __future__ import annotations

import os
from typing import TypeVar

from google.protobuf import message, text_format

from ffn.errors import FFNError

M = TypeVar("M", bound=message.Message)


def parse_text_proto(text: str, msg: M, where: str) -> M:
  """Parses ``text`` into ``msg``; a syntax error -> FFNError naming ``where``, line and column."""
  try:
    text_format.Parse(text, msg)
  except text_format.ParseError as e:
    raise FFNError(f"{where}: malformed {msg.DESCRIPTOR.name} text proto: {e}") from None
  return msg


def read_text_proto(path_or_text: str, msg: M, flag: str, what: str) -> M:
  """``msg`` parsed from the pbtxt file ``path_or_text``, or from the text itself.

  ``flag`` names the source of inline text in errors (``--inference_request``); ``what`` names
  the message in file errors ("inference request"). A value that looks like a file name but is
  not a file is reported as a missing file.
  """
  if os.path.isfile(path_or_text):
    try:
      with open(path_or_text, encoding="utf-8") as f:
        text = f.read()
    except (OSError, UnicodeDecodeError) as e:
      raise FFNError(f"{path_or_text}: cannot read the {what} ({e})") from None
    return parse_text_proto(text, msg, path_or_text)
  if path_or_text.strip().endswith((".pbtxt", ".txt")) or "{" not in path_or_text:
    raise FFNError(f"{path_or_text}: {what} file not found")
  return parse_text_proto(path_or_text, msg, flag)
