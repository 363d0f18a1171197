"""How the store behaves at a million images: build a synthetic store through the store's own
methods, then time what cron runs every night.

    python benchmarks/store_scale.py --n 1000000 --json store.json     # ~3 GB under $TMPDIR
    python benchmarks/store_scale.py --n 100000                         # quick look

Steps timed (each on the same store, in this order):

- ``register``: probs [C] float32 + embedding [D] in batches of ``--batch`` images, handed to
  ``OutputWriter`` as the embed loop does (``--register writer``: a background thread registers
  them, several batches in one append + fsync + transaction when they wait), or one
  ``Store.add_outputs`` per batch in the loop's thread (``--register direct``); images/s, the
  final merge included.
- ``pool``: everything a selection needs: ``pool_rows`` (one row per content, path order, labeled
  and exported masks) plus ``probs`` and ``embedding`` arrays for all N images.
- ``record_run``: ``Store.record_run`` of an N-image ranking (the rankings of older runs beyond the
  latest 3 are deleted in the same transaction, as in every run).
- ``status`` (the CLI's ``store_status``), ``export_top1000`` (``export_latest --top 1000`` to a
  file), ``label_10k`` (``import_labels`` of 10,000 relative paths): each a fresh process-level
  call on the 1M store, as a user would run them.
- ``store_bytes``: size on disk, and per image.

References measured in the same run, on the same files:

- ``roof_read_s``: the embedding and probability segment files read with ``numpy.fromfile`` into
  fresh arrays (what a selection-ready load cannot beat: the bytes themselves);
- ``roof_write_mb_s``: the disk's write bandwidth with one fsync per registration batch (the same
  bytes per batch as ``register``), which bounds registration for a given row size.

``--select NAME`` (repeatable) runs a selection in a fresh process on the built store (pool load,
then ``NAME`` with ``--budget``), reporting its wall time and peak RSS (``VmHWM``: a child's
``ru_maxrss`` starts from its parent's); ``--select
load`` loads the pool with probabilities and embeddings and selects nothing (what a fresh ``alselect
score`` pays before a strategy that needs embeddings). Peak RSS of
the whole benchmark process is reported at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
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
from alselect.store.writer import OutputWriter

KEY = "f" * 64


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def sha_of(i: int) -> str:
    """A real SHA-256 per image: the contents of one batch are spread over the whole key space, as
    a folder's are. (An earlier version used ``i * 2654435761`` in the leading digits, which kept
    each batch's keys in a narrow range, so a batch touched a few B-tree pages instead of one per
    image and registration looked about twice as fast as it is.)"""
    return hashlib.sha256(i.to_bytes(8, "little")).hexdigest()


def build(
    path: Path, n: int, classes: int, dim: int, batch: int, dtype: str, register: str = "writer"
) -> dict[str, float]:
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
        shas = [sha_of(i) for i in range(n)]  # hashing is not the store's work: done before the clock
        start = time.perf_counter()
        if register == "writer":  # as the embed loop registers: handed to OutputWriter's thread
            with OutputWriter(store, KEY) as writer:
                for lo in range(0, n, batch):
                    hi = min(lo + batch, n)
                    writer.put(shas[lo:hi], {"probs": probs[: hi - lo], "embedding": emb[: hi - lo]})
            results["register_groups"] = writer.groups
        else:  # one add_outputs (append, fsync, transaction) per batch, in this thread
            for lo in range(0, n, batch):
                hi = min(lo + batch, n)
                store.add_outputs(KEY, shas[lo:hi], {"probs": probs[: hi - lo], "embedding": emb[: hi - lo]})
        store.merge_outputs()  # as an embedding pass ends: every row in the content-keyed table
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


ROOF_CODE = """
import sys, time
from pathlib import Path
import numpy as np
path = Path(sys.argv[1])
files = sorted((path / "arrays").rglob("probs-*")) + sorted((path / "arrays").rglob("embedding-*"))
start = time.perf_counter()
arrays = [np.fromfile(file, dtype=np.uint8) for file in files]
print(time.perf_counter() - start)
"""


def roof_read(path: Path) -> float:
    """Seconds to read every probs and embedding segment file into fresh arrays (numpy.fromfile),
    in a fresh process like ``--select``'s load: the same memory first-touch costs."""
    command = [sys.executable, "-c", ROOF_CODE, str(path)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(done.stdout.strip())


def roof_write(work: Path, batch_bytes: int, batches: int) -> float:
    """MB/s of appending ``batch_bytes`` and fsyncing, ``batches`` times (two files: probs, embedding)."""
    data = np.random.default_rng(1).integers(0, 255, batch_bytes, dtype=np.uint8).tobytes()
    fds = [os.open(work / f"roof-{i}", os.O_WRONLY | os.O_CREAT, 0o644) for i in range(2)]
    start = time.perf_counter()
    try:
        for _ in range(batches):
            for fd, part in zip(fds, (data[: batch_bytes // 50], data), strict=True):
                os.write(fd, part)
                os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)
    return batches * batch_bytes / 1e6 / (time.perf_counter() - start)


SELECT_CODE = """
import json, sys, time
from alselect.store import Store
from alselect.strategies import PoolInputs, build_strategy
path, key, name, budget = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
start = time.perf_counter()
with Store.open(path) as store:
    pool = store.pool_rows("/pool", [key])
    strategy = None if name == "load" else build_strategy(name, seed=0)
    probs = store.pool_array(pool, key, "probs")
    emb = store.pool_array(pool, key, "embedding") if not strategy or "embeddings" in strategy.needs else None
loaded = time.perf_counter() - start
inputs = PoolInputs(probs=probs, labeled=pool.labeled, embeddings=emb, pending=pool.exported & ~pool.labeled)
picked = strategy.select(budget if strategy.batch_aware else None, inputs) if strategy else None
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
selected = time.perf_counter() - start - loaded
print(json.dumps({"load_s": loaded, "select_s": selected, "peak_rss_mb": peak_kb / 1024}))
"""


def measure_select(path: Path, name: str, budget: int) -> dict[str, float]:
    """Pool load + selection ``name`` in a fresh process: its times and peak RSS."""
    done = subprocess.run(
        [sys.executable, "-c", SELECT_CODE, str(path), KEY, name, str(budget)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1024, help="images per add_outputs call")
    parser.add_argument(
        "--register",
        choices=("writer", "direct"),
        default="writer",
        help="writer: batches handed to OutputWriter, as the embed loop does (grouped when they wait); "
        "direct: one Store.add_outputs per batch",
    )
    parser.add_argument("--dtype", default="float32", help="embedding dtype on disk (float32 or float16)")
    parser.add_argument("--keep", type=Path, default=None, help="build the store here and keep it")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--select", action="append", default=[], help="strategy to run on the store")
    parser.add_argument("--budget", type=int, default=1000, help="budget for --select batch strategies")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="alselect-store-scale-"))
    path = args.keep or work / "store"
    try:
        results: dict[str, Any] = {"n": args.n, "dim": args.dim, "classes": args.classes, "batch": args.batch}
        results["register"] = args.register
        results.update(build(path, args.n, args.classes, args.dim, args.batch, args.dtype, args.register))
        with Store.open(path, write=True) as store:
            measure_nightly(store, results, work, args.n)
        results["roof_read_s"] = roof_read(path)
        row_bytes = args.classes * 4 + args.dim * np.dtype(args.dtype).itemsize
        results["roof_write_mb_s"] = roof_write(work, row_bytes * args.batch, 200)
        results["register_mb_s"] = results["register_images_per_s"] * row_bytes / 1e6
        for name in args.select:
            for field, value in measure_select(path, name, args.budget).items():
                results[f"select_{name}_{field}"] = value
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
