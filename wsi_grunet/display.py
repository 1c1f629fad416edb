"""File names as text that every output can hold.

A file name is bytes. On shares mounted from other systems those bytes are often not UTF-8 (Latin-1
``é`` is the single byte ``0xe9``); Python then keeps each such byte as a lone surrogate
(``os.fsdecode``), which opens the file fine but cannot be written to UTF-8 text: the CSV, JSON, HTML,
Parquet and log files of a run. :func:`display_text` is the form those outputs use.
"""

from __future__ import annotations

import os


def display_text(value: str | bytes | os.PathLike) -> str:
    """``value`` (a path, a name, or a message holding one) as valid UTF-8 text.

    Bytes that are not UTF-8 appear escaped as ``\\xff``; text that is already valid is returned
    unchanged, so applying it twice changes nothing.
    """
    text = os.fsdecode(value)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that stands for no byte (text built elsewhere, not a file name)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
