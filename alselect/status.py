"""A summary of what a store holds, for ``alselect status`` and the ``score`` summary.

Counts follow the identity rules of ``alselect.identity`` and add up: per folder, the files found
at the last scan are ``present + failed``; the present files hold ``distinct`` images plus
``duplicates`` (files whose content another present file already has); ``absent`` counts paths
seen before whose content is no longer anywhere in the folder, ``moved`` the old paths of content
still in the folder under another path (moved or renamed), and ``copies_removed`` paths of a
duplicate copy that was deleted while another copy stayed.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from alselect.store import COPY_REMOVED, Store, model_display_name
from alselect.store.names import from_db, to_db


@dataclass(frozen=True)
class FolderCounts:
    folder: str
    present: int
    distinct: int
    duplicates: int
    failed: int
    absent: int
    moved: int
    copies_removed: int = 0

    @property
    def files(self) -> int:
        """Files found at the last scan."""
        return self.present + self.failed

    def describe(self) -> str:
        """The one wording of these counts, shared by ``status`` and the ``embed``/``score`` summary."""
        return describe_files(asdict(self))


def describe_files(counts: Mapping[str, Any]) -> str:
    """``8 found: 5 present (4 image(s), 1 duplicate file(s)), 3 failed; 0 absent``, from a
    ``FolderCounts`` or its dict (``status --json``'s ``folders`` entries and ``images`` totals)."""
    present, failed = counts["present"], counts["failed"]
    moved = f"; {counts['moved']} old path(s) of moved files" if counts["moved"] else ""
    copies = counts.get("copies_removed", 0)
    removed = f"; {copies} removed duplicate copy(ies)" if copies else ""
    return (
        f"{present + failed} found: {present} present ({counts['distinct']} image(s), "
        f"{counts['duplicates']} duplicate file(s)), {failed} failed; "
        f"{counts['absent']} absent{moved}{removed}"
    )


_STILL_HERE = (
    "EXISTS (SELECT 1 FROM images p WHERE p.root = i.root AND p.status = 'present' AND p.sha256 = i.sha256)"
)


def folder_counts(store: Store, folder: str | None = None) -> list[FolderCounts]:
    """Counts per image folder (one folder, or all in path order).

    Each count walks the index on ``(root, status, sha256)``: distinct contents are counted in
    index order (no temporary B-tree), and only absent rows look for a present copy.
    """
    where, params = ("WHERE root = ?", [to_db(folder)]) if folder is not None else ("", [])
    by_status: dict[Any, Counter[str]] = {}
    for root, status, count in store.rows(
        f"SELECT root, status, COUNT(*) FROM images {where} GROUP BY root, status", params
    ):
        by_status.setdefault(root, Counter())[status] = count
    result = []
    for root in sorted(by_status):  # the stored text's order, as SQLite's ORDER BY root
        counts = by_status[root]
        distinct = store.scalar(
            "SELECT COUNT(*) FROM (SELECT DISTINCT sha256 FROM images "
            "WHERE root = ? AND status = 'present' AND sha256 IS NOT NULL)",
            (root,),
        )
        absent, moved, copies = store.rows(
            f"""SELECT COALESCE(SUM(NOT {_STILL_HERE}), 0),
                       COALESCE(SUM({_STILL_HERE} AND i.reason IS NOT ?), 0),
                       COALESCE(SUM({_STILL_HERE} AND i.reason IS ?), 0)
                FROM images i WHERE i.root = ? AND i.status = 'absent'""",
            (COPY_REMOVED, COPY_REMOVED, root),
        )[0]
        present, failed = counts["present"], counts["failed"]
        duplicates = present - distinct
        result.append(
            FolderCounts(from_db(root), present, distinct, duplicates, failed, absent, moved, copies)
        )
    return result


def store_status(store: Store, list_failed: bool = False) -> dict[str, Any]:
    """Counts of files and images per folder and in total, models, runs, labels (per class), exports."""
    reasons = Counter[str]()
    failed = store.rows(
        "SELECT root, relpath, reason FROM images WHERE status = 'failed' ORDER BY root, relpath"
    )
    for _root, _rel, reason in failed:
        reasons[(reason or "unknown").split(":")[0]] += 1
    models = [
        {
            "model": model_display_name(ckpt, key, derived),
            "checkpoint": from_db(path),
            "kind": kind,
            "classes": num_classes,
            "dim": dim,
            "precision": derived.get("precision", "fp32"),
            "mc_samples": derived.get("mc_samples"),
            "embedding_dtype": derived.get("embedding_dtype", "float32") if dim is not None else None,
            "embedded": count,
            "failed": model_failures,
        }
        for key, ckpt, path, kind, num_classes, dim, derived, model_failures, count in (
            (*row[:6], json.loads(row[6] or "{}"), row[7], store.output_count(row[0]))
            for row in store.rows(
                "SELECT m.key, m.checkpoint_sha256, m.path, m.kind, m.num_classes, m.dim, m.preprocess, "
                "(SELECT COUNT(*) FROM output_failures f WHERE f.model = m.id) "
                "FROM models m ORDER BY m.added_at"
            )
        )
    ]
    folders = folder_counts(store)
    totals = {
        name: sum(getattr(f, name) for f in folders)
        for name in ("present", "absent", "failed", "distinct", "duplicates", "moved", "copies_removed")
    }
    latest = store.latest_run()
    status: dict[str, Any] = {
        "store": str(store.path),
        "read_only": store.read_only,
        "images": totals,
        "failed_reasons": dict(reasons.most_common()),
        "folders": [asdict(f) for f in folders],
        "models": models,
        "runs": store.scalar("SELECT COUNT(*) FROM runs") or 0,
        "labeled": store.scalar("SELECT COUNT(*) FROM labels") or 0,
        "label_classes": dict(
            store.rows(
                "SELECT label, COUNT(*) FROM labels WHERE label IS NOT NULL "
                "GROUP BY label ORDER BY COUNT(*) DESC, label"
            )
        ),
        "exported": store.scalar("SELECT COUNT(DISTINCT sha256) FROM exported") or 0,
        "exports": store.scalar("SELECT COUNT(*) FROM exports") or 0,
        "latest_run": None
        if latest is None
        else {
            "id": latest["id"],
            "strategy": latest["strategy"],
            "created_at": latest["created_at"],
            "folder": latest["root"],
            "pool_size": latest["pool_size"],
            "labeled": latest["labeled_count"],
            "selected": latest["selected"],
            "unexported": store.run_item_states(latest["id"])["open"],
        },
    }
    if list_failed:
        status["failed_images"] = [
            {"folder": from_db(root), "path": from_db(rel), "reason": reason} for root, rel, reason in failed
        ]
        status["failed_outputs"] = failed_outputs(store)
    return status


def failed_outputs(store: Store) -> list[dict[str, Any]]:
    """Present files whose content one model could not give outputs for (not finite, beyond
    float16), with the model's name and the reason: the file is fine, other models still read it."""
    names = store.model_names()
    return [
        {"folder": from_db(root), "path": from_db(rel), "model": names[key], "reason": reason}
        for root, rel, key, reason in store.rows(
            "SELECT i.root, i.relpath, m.key, f.reason FROM output_failures f "
            "JOIN models m ON m.id = f.model JOIN images i ON i.sha256 = f.sha256 "
            "WHERE i.status = 'present' ORDER BY i.root, i.relpath, m.added_at"
        )
    ]
