"""A summary of what a store holds, for ``alselect status``."""

from __future__ import annotations

from collections import Counter
from typing import Any

from alselect.store import Store, model_display_name
from alselect.store.names import from_db


def store_status(store: Store, list_failed: bool = False) -> dict[str, Any]:
    """Counts of images by status (failed by reason), models, runs, labels and exports."""
    by_status = dict(store.rows("SELECT status, COUNT(*) FROM images GROUP BY status"))
    reasons = Counter[str]()
    failed = store.rows(
        "SELECT root, relpath, reason FROM images WHERE status = 'failed' ORDER BY root, relpath"
    )
    for _root, _rel, reason in failed:
        reasons[(reason or "unknown").split(":")[0]] += 1
    models = [
        {
            "model": model_display_name(ckpt, key),
            "checkpoint": from_db(path),
            "kind": kind,
            "classes": num_classes,
            "dim": dim,
            "embedded": count,
        }
        for key, ckpt, path, kind, num_classes, dim, count in store.rows(
            "SELECT m.key, m.checkpoint_sha256, m.path, m.kind, m.num_classes, m.dim, "
            "(SELECT COUNT(*) FROM embeddings e WHERE e.model_key = m.key) "
            "FROM models m ORDER BY m.added_at"
        )
    ]
    latest = store.latest_run()
    status: dict[str, Any] = {
        "store": str(store.path),
        "images": {
            "present": by_status.get("present", 0),
            "absent": by_status.get("absent", 0),
            "failed": by_status.get("failed", 0),
        },
        "failed_reasons": dict(reasons.most_common()),
        "folders": [from_db(r[0]) for r in store.rows("SELECT DISTINCT root FROM images ORDER BY root")],
        "models": models,
        "runs": store.scalar("SELECT COUNT(*) FROM runs") or 0,
        "labeled": store.scalar("SELECT COUNT(*) FROM labels") or 0,
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
            "selected": latest["selected"],
        },
    }
    if list_failed:
        status["failed_images"] = [
            {"folder": from_db(root), "path": from_db(rel), "reason": reason} for root, rel, reason in failed
        ]
    return status
