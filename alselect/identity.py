"""What an image is, and which of its paths stands for it (README "Identity and counts").

- An image is its content: the sha256 of the file's bytes. Each distinct content in a folder is one
  pool row, embedded once per model, ranked, exported and labeled once.
- Paths with the same bytes (copies, hard links, symlinks) are duplicates of one image. One path
  represents it: a path that reaches the file without a symlink before one that goes through a
  symlink (the file's own name or a folder on the way), then the first in path order (the byte
  order SQLite uses). The other paths are counted as duplicates.
- A file moved or renamed keeps its identity: embedding, label and export follow the content. An
  edited file is new content: it is embedded again and may be selected again, even if the old
  content was labeled.

``Store.pool_rows`` applies the representative rule numerically (rows in path order, then a stable
sort by ``link``: the order ``REPRESENTATIVE_ORDER`` names); ``alselect.status.folder_counts``
counts files, images and duplicates by it.
"""

from __future__ import annotations

# Within one content, the representative comes first when rows are sorted by these ``images``
# columns: ``ORDER BY link, relpath``.
REPRESENTATIVE_ORDER = ("link", "relpath")
