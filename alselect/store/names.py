"""File names in the database: any name Linux allows, stored losslessly as valid UTF-8 text.

Python hands over the bytes of a name that are not UTF-8 as lone surrogates U+DC80..U+DCFF
(``os.fsdecode``, PEP 383); that string opens the right file, but SQLite cannot store it as text.
In the database each such byte is written as NUL plus two hex digits instead. No path contains
NUL, so the stored form is unambiguous, and names that are valid UTF-8 (nearly all) are stored
unchanged. Every path or folder bound into or read out of a query goes through ``to_db`` /
``from_db``.
"""

from __future__ import annotations

import re

_SURROGATE = re.compile("[\udc80-\udcff]")
_STORED = re.compile("\x00([0-9a-f]{2})")


def to_db(name: str) -> str:
    """The database form of a folder or path string from the file system."""
    if name.isascii():
        return name
    return _SURROGATE.sub(lambda m: f"\x00{ord(m.group()) - 0xDC00:02x}", name)


def from_db(text: str) -> str:
    """The file-system string (surrogate-escaped where the name is not UTF-8) of a stored name."""
    if "\x00" not in text:
        return text
    return _STORED.sub(lambda m: chr(0xDC00 + int(m.group(1), 16)), text)
