"""Image URIs: what ``--uri-prefix`` may be, how an export joins it with a path, and how ``label``
takes the path back out. One module so that both directions always agree."""

from __future__ import annotations

import os
import re
from urllib.parse import quote, unquote, urlsplit

from alselect.errors import UsageError

URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
WEB_SCHEMES = ("http", "https")
BUCKET_SCHEMES = ("s3", "gs")
SCHEMES = (*WEB_SCHEMES, *BUCKET_SCHEMES)


def uri_scheme(uri: str) -> str:
    """The lower-case scheme of ``uri`` (``s3``, ``https``...), or ``""`` for a plain path."""
    match = URL_RE.match(uri)
    return match.group(0)[:-3].lower() if match else ""


def check_uri_prefix(prefix: str) -> str:
    """``prefix`` with a final ``/``, or a ``UsageError`` saying what a prefix may be.

    Accepted: ``http://HOST/...``, ``https://HOST/...``, ``s3://BUCKET/...``, ``gs://BUCKET/...``
    with a host or bucket name and no query string or fragment (a path is appended to the prefix,
    so anything after ``?`` or ``#`` would swallow it).
    """
    accepted = ", ".join(f"{scheme}://" for scheme in SCHEMES)
    hint = f"--uri-prefix takes {accepted} followed by a host or bucket (e.g. s3://BUCKET/pool/)"
    scheme = uri_scheme(prefix)
    if scheme not in SCHEMES:
        raise UsageError(f"{hint}, not {prefix!r}")
    parts = urlsplit(prefix)
    if not parts.netloc or parts.netloc.startswith("/"):
        raise UsageError(f"{hint}; {prefix!r} names no host or bucket")
    if "?" in prefix or "#" in prefix:
        raise UsageError(f"{hint}; {prefix!r} has a query string or fragment, which the path cannot follow")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in prefix):
        raise UsageError(f"{hint}; {prefix!r} contains blanks or control characters")
    if not is_utf8(prefix):
        raise UsageError(f"{hint}; {prefix!r} is not valid UTF-8")
    return prefix if prefix.endswith("/") else prefix + "/"


def is_utf8(text: str) -> bool:
    """Whether ``text`` is valid Unicode (a file name that is not UTF-8 holds surrogate escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def join_uri(prefix: str, relpath: str) -> str:
    """``prefix`` + the folder-relative path: percent-encoded for web URLs, verbatim for bucket URIs.

    ``https://host/pool/`` + ``a b#1.jpg`` → ``https://host/pool/a%20b%231.jpg``; the bytes of a name
    that is not UTF-8 are percent-encoded as they are (``caf\\xe9.png`` → ``caf%E9.png``). An
    ``s3://`` or ``gs://`` URI names an object key, which AWS and Google tools take as is
    (``s3://b/a b.jpg``), so only web URLs are encoded. A missing ``/`` at the end of the prefix is
    added. ``strip_uri_prefix`` is the inverse.
    """
    if not prefix.endswith("/"):
        prefix += "/"
    if uri_scheme(prefix) in WEB_SCHEMES:
        return prefix + quote(os.fsencode(relpath), safe="/")
    return prefix + relpath


def strip_uri_prefix(uri: str, prefix: str | None) -> str | None:
    """The folder-relative path of ``uri`` when it starts with the export's ``--uri-prefix``, else
    ``None``; the inverse of ``join_uri``. Web URLs are percent-decoded (bytes that are not UTF-8
    come back as the file name's surrogate escapes); bucket URIs carry the object key as is, so
    nothing is decoded: ``s3://b/pool/a%41.png`` is the file ``a%41.png``."""
    if not prefix:
        return None
    if not prefix.endswith("/"):
        prefix += "/"
    if not uri.startswith(prefix):
        return None
    rest = uri[len(prefix) :]
    if uri_scheme(prefix) in WEB_SCHEMES:
        rest = unquote(rest, errors="surrogateescape")
    return rest or None


def is_url(text: str) -> bool:
    return bool(URL_RE.match(text))
