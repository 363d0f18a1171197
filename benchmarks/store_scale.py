"""How the store behaves at a million images: build a synthetic store through the store's own
methods, then time what cron runs every night.

    python benchmarks/store_scale.py --n 1000000 --json store.json     # ~3 GB under $TMPDIR
    python benchmarks/store_scale.py --n 100000                         # quick look

Steps timed (each on the same store, in this order):

- ``register``: ``Store.add_outputs`` of probs [C] float32 + embedding [D] in batches of
  ``--batch`` images (arrays appended and fsynced, then registered in one transaction each), as
  the embed loop does; reported as images/s.
- ``pool``: everything a selection needs: ``pool_rows`` (one row per content, path order, labeled
  and exported masks) plus ``probs`` and ``embedding`` arrays for all N images.
- ``record_run``: ``Store.record_run`` of an N-image ranking (the rankings of older runs beyond the
  latest 3 are deleted in the same transaction, as in every run).
- ``status`` (the CLI's ``store_status``), ``export_top1000`` (``export_latest --top 1000`` to a
  file), ``label_10k`` (``import_labels`` of 10,000 relative paths): each a fresh process-level
  call on the 1M store, as a user would run them.
- ``store_bytes``: size on disk, and per image.

Peak RSS of the whole process is reported at the end (``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alselect.export import export_latest
from alselect.labels import import_labels
from alselect.pipeline import ranking_of
from alselect.status import store_status
from alselect.store import Store

KEY = "f" * 64


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def sha_of(i: int) -> str:
    return f"{i * 2654435761 % (1 << 64):016x}{i:048x}"


def build(path: Path, n: int, classes: int, dim: int, batch: int, dtype: str) -> dict[str, float]:
    rng = np.random.default_rng(0)
    results: dict[str, float] = {}
    with Store.open(path, write=True, create=True) as store:
        store.register_model(KEY, KEY, "/model.pt", "alselect", "resnet18", classes, None, {})
        start = time.perf_counter()
        for lo in range(0, n, 100_000):
            hi = min(lo + 100_000, n)
            store.upsert_images(
                "/pool",
                [
                    (f"dir{i // 1000:04d}/img_{i:07d}.jpg", sha_of(i), 1000, 1, "present", None)
                    for i in range(lo, hi)
                ],
            )
        results["images_table_s"] = time.perf_counter() - start
        probs = rng.dirichlet(np.ones(classes), size=batch).astype(np.float32)
        emb = rng.standard_normal((batch, dim)).astype(dtype)
        start = time.perf_counter()
        for lo in range(0, n, batch):
            hi = min(lo + batch, n)
            store.add_outputs(
                KEY,
                [sha_of(i) for i in range(lo, hi)],
                {"probs": probs[: hi - lo], "embedding": emb[: hi - lo]},
            )
        elapsed = time.perf_counter() - start
        results["register_s"] = elapsed
        results["register_images_per_s"] = n / elapsed
        store.add_labels([sha_of(i) for i in range(0, n, 50)], "bench")  # 2% labeled
    return results


def measure_nightly(store: Store, results: dict[str, Any], work: Path, n: int) -> None:
    """Time the pool load, a full ranking's record, status, export and label on the built store."""
    start = time.perf_counter()
    pool = store.pool_rows("/pool", [KEY])
    results["pool_rows_s"] = time.perf_counter() - start
    start = time.perf_counter()
    probs = store.pool_array(pool, KEY, "probs")
    results["pool_probs_s"] = time.perf_counter() - start
    start = time.perf_counter()
    store.pool_array(pool, KEY, "embedding")
    results["pool_embedding_s"] = time.perf_counter() - start
    results["pool_total_s"] = results["pool_rows_s"] + results["pool_probs_s"] + results["pool_embedding_s"]
    scores = -(probs * np.log(np.maximum(probs, 1e-12))).sum(1)
    order = np.argsort(-scores, kind="stable")
    ranking = ranking_of(pool, probs, order, scores[order])
    run = {"root": "/pool", "model_key": KEY, "strategy": "entropy", "params": {}, "budget": None}
    run |= {"pool_size": len(pool), "labeled_count": 0, "version": "bench", "command": None}
    for _ in range(3):  # fill the kept rankings, so the timed record also prunes one
        store.record_run(**run, ranking=ranking)
    start = time.perf_counter()
    store.record_run(**run, ranking=ranking)
    results["record_run_s"] = time.perf_counter() - start
    del pool, probs, ranking
    results["status_s"], _ = timed(lambda: store_status(store))
    out = work / "export.csv"
    results["export_top1000_s"], _ = timed(lambda: export_latest(store, "csv", top=1000, output=out))
    step = max(1, n // 10_000)
    paths = "\n".join(f"dir{i // 1000:04d}/img_{i:07d}.jpg" for i in range(1, n, step))
    results["label_10k_s"], _ = timed(lambda: import_labels(store, paths, "bench", cwd="/"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1024, help="images per add_outputs call")
    parser.add_argument("--dtype", default="float32", help="embedding dtype on disk (float32 or float16)")
    parser.add_argument("--keep", type=Path, default=None, help="build the store here and keep it")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="alselect-store-scale-"))
    path = args.keep or work / "store"
    try:
        results: dict[str, Any] = {"n": args.n, "dim": args.dim, "classes": args.classes, "batch": args.batch}
        results.update(build(path, args.n, args.classes, args.dim, args.batch, args.dtype))
        with Store.open(path, write=True) as store:
            measure_nightly(store, results, work, args.n)
        results["store_bytes"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        results["bytes_per_image"] = results["store_bytes"] / args.n
        results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        cpu = platform.processor() or platform.machine()
        results["machine"] = f"{cpu}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
        for key, value in results.items():
            print(f"{key:24s} {value:.3f}" if isinstance(value, float) else f"{key:24s} {value}")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
