"""User-facing errors.

Anything raised as :class:`FFNError` is a problem with the user's input (a missing file, a wrong
dataset name or dtype, a malformed config). The CLI prints its message as one line and exits with
status 2, without a traceback.
"""


class FFNError(Exception):
  """An input problem the user can fix; the message names the file/dataset and what is wrong."""
