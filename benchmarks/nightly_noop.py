"""A nightly ``score`` on a folder where nothing changed: how long, and where the time goes.

    python benchmarks/nightly_noop.py --n 1000000 --folder /data/bench-pool    # makes 1M small files once
    python benchmarks/nightly_noop.py --n 100000

The folder holds N small files (distinct 16-byte contents named ``.png``, 1,000 per subfolder),
created once and reused. A store is built through the library's own calls: a first sync hashes
every file, and each content gets stored outputs (``probs`` [10], ``embedding`` [512]) written with
``Store.add_outputs`` in batches, as if a model had embedded them. Then the timed part runs
``alselect.pipeline.score_folder`` with the bundled sample checkpoint and ``entropy``, exactly what
``alselect score`` does: walk + stat, compare with the store, find nothing to embed, load the pool,
score, record the ranking. The model's outputs were registered under the checkpoint's own key, so
it embeds nothing. The plain timing comes first; a second no-op night runs under cProfile for
the phases (cumulative seconds; the profiler inflates Python-heavy phases).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alselect.discover import sha256_file
from alselect.embed import EmbedOptions
from alselect.pipeline import ModelSpec, score_folder
from alselect.store import Store
from alselect.sync import sync_folder

REPO = Path(__file__).resolve().parent.parent
CHECKPOINT = REPO / "sample_data" / "model.pt"


def make_folder(folder: Path, n: int) -> None:
    marker = folder / f".complete-{n}"
    if marker.exists():
        return
    for i in range(n):
        sub = folder / f"d{i // 1000:05d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"img_{i:07d}.png").write_bytes(i.to_bytes(16, "little"))
    marker.touch()


def build_store(store_path: Path, folder: Path, key: str) -> None:
    rng = np.random.default_rng(0)
    with Store.open(store_path, write=True, create=True) as store:
        store.register_model(key, key, str(CHECKPOINT), "alselect", "small_cnn", 10, None, {})
        sync_folder(store, folder.resolve())
        shas = [r[0] for r in store.rows("SELECT DISTINCT sha256 FROM images WHERE status = 'present'")]
        probs = rng.dirichlet(np.ones(10), size=4096).astype(np.float32)
        emb = rng.standard_normal((4096, 512)).astype(np.float32)
        for lo in range(0, len(shas), 4096):
            chunk = shas[lo : lo + 4096]
            store.add_outputs(key, chunk, {"probs": probs[: len(chunk)], "embedding": emb[: len(chunk)]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--folder", type=Path, default=None, help="where the N files live (kept)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="alselect-noop-"))
    folder = args.folder or work / "pool"
    try:
        start = time.perf_counter()
        make_folder(folder, args.n)
        print(f"folder ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        key = sha256_file(CHECKPOINT)
        start = time.perf_counter()
        build_store(work / "store", folder, key)
        print(f"store built in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        options = EmbedOptions(device="cpu", workers=0)
        with Store.open(work / "store", write=True) as store:
            start = time.perf_counter()
            result = score_folder(store, folder, ModelSpec(CHECKPOINT), "entropy", options=options)
            elapsed = time.perf_counter() - start
        assert result.embed.embedded == 0 and result.selected == args.n, result
        print(f"n={args.n} nightly no-op score: {elapsed:.2f} s (load {os.getloadavg()[0]:.1f})")
        print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
        # A second no-op night under cProfile, for where the time goes (the profiler slows
        # Python-heavy phases, so its total is above the plain figure).
        profile = cProfile.Profile()
        with Store.open(work / "store", write=True) as store:
            profile.enable()
            score_folder(store, folder, ModelSpec(CHECKPOINT), "entropy", options=options)
            profile.disable()
        stats = pstats.Stats(profile)
        stats.sort_stats("cumulative").print_stats(r"alselect/(sync|discover|pipeline|store)", 25)
    finally:
        if args.folder is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            shutil.rmtree(work / "store", ignore_errors=True)


if __name__ == "__main__":
    main()
