"""One exception type for bad input, so every CLI can print it as a single clear line and exit non-zero."""

from __future__ import annotations


class GacError(Exception):
    """Bad input: a file or a parameter that is not what GAC expects.

    The message is one line that names the file or the ``params.yaml`` key and says what was expected; the CLI prints
    it as ``gac: error: <message>`` without a traceback.
    """
