"""Selection at scale: coreset and BADGE through ``Strategy.select`` against straightforward references.

Every case runs in its own subprocess, which loads the float16 input fully, imports torch and
alselect, and only then takes its memory baseline; the case's time and peak memory (``VmHWM`` after
resetting it, minus the RSS at the baseline) cover the selection call alone. The Markdown report
goes to stdout, progress to stderr. See benchmarks/README.md.

    python benchmarks/selection_scale.py [--n 1000000] [--device auto|cpu|cuda] [--json results.json]
        [--cases coreset,coreset-cold,badge,coreset-200k,numpy-200k,numpy,deepal,coreset-deepal-n]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

DIMS = 512
CLASSES = 10
CLUSTERS = 100
ALL_CASES = (
    "coreset",
    "coreset-cold",
    "badge",
    "coreset-200k",
    "numpy-200k",
    "numpy",
    "deepal",
    "coreset-deepal-n",
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- data ---------------------------------------------------------------------------------------


def write_inputs(folder: Path, n: int, seed: int = 0) -> None:
    """Clustered float16 embeddings ``[n, 512]`` and probabilities ``[n, 10]``, written chunk by chunk.

    100 Gaussian clusters: centres ~ N(0, I), per-cluster spread σ ~ U(0.3, 0.6), sizes from a
    Dirichlet(2). Each cluster has a class (its index mod 10) and a confidence; probabilities are the
    softmax of 4·confidence on that class plus N(0, 1) noise per class.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLUSTERS, DIMS), dtype=np.float32)
    sigma = rng.uniform(0.3, 0.6, CLUSTERS).astype(np.float32)
    confidence = rng.uniform(0.2, 1.0, CLUSTERS).astype(np.float32)
    cluster = rng.choice(CLUSTERS, size=n, p=rng.dirichlet(np.full(CLUSTERS, 2.0)))
    emb = np.lib.format.open_memmap(folder / "emb.npy", mode="w+", dtype=np.float16, shape=(n, DIMS))
    probs = np.lib.format.open_memmap(folder / "probs.npy", mode="w+", dtype=np.float32, shape=(n, CLASSES))
    for start in range(0, n, 65536):
        c = cluster[start : start + 65536]
        noise = rng.standard_normal((c.size, DIMS), dtype=np.float32)
        emb[start : start + c.size] = centres[c] + sigma[c, None] * noise
        logits = rng.standard_normal((c.size, CLASSES), dtype=np.float32)
        logits[np.arange(c.size), c % CLASSES] += 4.0 * confidence[c]
        logits = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs[start : start + c.size] = logits / logits.sum(axis=1, keepdims=True)
    emb.flush()
    probs.flush()
    np.save(folder / "cluster.npy", cluster)


def labeled_rows(n: int, count: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, count).astype(np.int64)) if count else np.zeros(0, np.int64)


# --- worker: one case per process --------------------------------------------------------------


def rss_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def numpy_kcenter(x32: np.ndarray, labeled: np.ndarray, budget: int) -> np.ndarray:
    """Reference: float32 numpy, one min-distance vector, labeled init in row chunks."""
    sq = np.einsum("ij,ij->i", x32, x32)
    m = np.full(x32.shape[0], np.inf, dtype=np.float32)
    centres = np.flatnonzero(labeled)
    for start in range(0, x32.shape[0], 8192):
        block = x32[start : start + 8192]
        for c0 in range(0, centres.size, 4096):
            c = centres[c0 : c0 + 4096]
            d = sq[start : start + 8192, None] + sq[None, c] - 2.0 * (block @ x32[c].T)
            np.minimum(m[start : start + 8192], d.min(axis=1), out=m[start : start + 8192])
    m[labeled] = -1.0
    picks = np.empty(budget, dtype=np.int64)
    for step in range(budget):
        j = int(np.argmax(m))
        picks[step] = j
        d = sq + sq[j] - 2.0 * (x32 @ x32[j])
        np.minimum(m, d, out=m)
        m[j] = -1.0
    return picks


def deepal_kcenter(x32: np.ndarray, labeled: np.ndarray, budget: int) -> np.ndarray:
    """Reference in the style of DeepAL's KCenterGreedy: the full N × N distance matrix in memory.

    Per step it takes the minimum over the covered columns, picks the farthest row, deletes it from
    the matrix and appends its column (both copy the unlabeled × covered block).
    """
    dist = x32 @ x32.T
    sq = dist.diagonal().copy()
    dist *= -2.0
    dist += sq[:, None]
    dist += sq[None, :]
    np.sqrt(np.maximum(dist, 0.0, out=dist), out=dist)
    covered = labeled.copy()
    block = dist[~covered, :][:, covered]
    picks = np.empty(budget, dtype=np.int64)
    for step in range(budget):
        local = int(block.min(axis=1).argmax()) if block.shape[1] else 0
        j = int(np.flatnonzero(~covered)[local])
        picks[step] = j
        covered[j] = True
        block = np.delete(block, local, 0)
        block = np.append(block, dist[~covered, j][:, None], axis=1)
    return picks


def run_case(case: str, data: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Load the input, take the baseline, run one selection, measure it."""
    import torch  # imported before the baseline: a one-time process cost, not the selection's memory

    from alselect.strategies import PoolInputs, make_strategy

    n_total, budget, n_labeled = settings["n"], settings["budget"], settings["labeled"]
    size = {"coreset-200k": min(200_000, n_total), "numpy-200k": min(200_000, n_total)}.get(case, n_total)
    if case in ("deepal", "coreset-deepal-n"):
        size = min(settings["deepal_n"], n_total)
    emb = np.load(data / "emb.npy", mmap_mode="r")[:size].copy()  # float16, fully in memory
    probs = np.load(data / "probs.npy", mmap_mode="r")[:size].copy()
    labeled = np.zeros(size, dtype=bool)
    if case != "coreset-cold":
        labeled[labeled_rows(size, n_labeled)] = True
    if settings["device"].startswith("cuda"):
        torch.cuda.init()
    baseline = rss_bytes("VmRSS")
    peak_reset = reset_peak()
    start, cpu_start = time.perf_counter(), time.process_time()
    if case in ("coreset", "coreset-cold", "coreset-200k", "coreset-deepal-n", "badge"):
        name = "badge" if case == "badge" else "coreset"
        strategy = make_strategy(name, seed=0, device=settings["device"])
        inputs = PoolInputs(probs=probs, labeled=labeled, embeddings=emb)
        picks = strategy.select(budget, inputs).indices
        if settings["device"].startswith("cuda"):
            torch.cuda.synchronize()
    elif case in ("numpy", "numpy-200k"):
        picks = numpy_kcenter(emb.astype(np.float32), labeled, budget)
    elif case == "deepal":
        picks = deepal_kcenter(emb.astype(np.float32), labeled, budget)
    else:
        raise SystemExit(f"unknown case {case}")
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = rss_bytes("VmHWM") if peak_reset else 0
    return {
        "case": case,
        "n": size,
        "labeled": int(labeled.sum()),
        "budget": budget,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "input_bytes": int(emb.nbytes),
        "peak_extra_bytes": max(0, peak - baseline) if peak_reset else None,
        "gpu_peak_bytes": int(torch.cuda.max_memory_allocated())
        if settings["device"].startswith("cuda")
        else None,
        "picks": picks.tolist(),
    }


# --- parent: generate, run cases, report --------------------------------------------------------


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu
            )
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_before": os.getloadavg(),
    }


def describe(case: str, settings: dict[str, Any]) -> str:
    device = settings["device"]
    return {
        "coreset": f"alselect `coreset` ({device})",
        "coreset-cold": f"alselect `coreset`, nothing labeled ({device})",
        "badge": f"alselect `badge`, C = {CLASSES} ({device})",
        "coreset-200k": f"alselect `coreset` ({device})",
        "coreset-deepal-n": f"alselect `coreset` ({device})",
        "numpy-200k": "numpy float32 k-center, min-distance vector",
        "numpy": "numpy float32 k-center, min-distance vector",
        "deepal": "DeepAL-style N × N distance matrix (numpy float32)",
    }[case]


def agreement(a: list[int], b: list[int]) -> str:
    if a == b:
        return "identical"
    first = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    return f"first {first} identical, {len(set(a) & set(b))}/{len(a)} shared"


def report(results: list[dict[str, Any]], settings: dict[str, Any], facts: dict[str, Any]) -> str:
    gpu = f", GPU {facts['gpu']}" if facts["gpu"] else ""
    lines = [
        f"Machine: {facts['cpu']}, {facts['cpus']} CPUs{gpu}; torch {facts['torch']} "
        f"({facts['torch_threads']} threads), numpy {facts['numpy']}, Python {facts['python']}.",
        f"Load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in facts['load_before'])}; "
        f"after: {', '.join(f'{v:.2f}' for v in facts['load_after'])}.",
        f"Input: float16 embeddings, D = {DIMS}, {CLUSTERS} Gaussian clusters; B = {settings['budget']}; "
        f"{settings['labeled']} evenly spaced rows labeled (except `coreset-cold`).",
        "",
        "| case | implementation | N | labeled | wall s | CPU s | peak extra memory | × fp16 input "
        "| picks vs reference |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    by_case = {r["case"]: r for r in results}
    references = {"coreset": "numpy", "coreset-200k": "numpy-200k", "coreset-deepal-n": "deepal"}
    for r in results:
        extra = r["peak_extra_bytes"]
        memory = "n/a" if extra is None else f"{extra / 2**20:,.0f} MiB"
        ratio = "n/a" if extra is None else f"{extra / r['input_bytes']:.2f}"
        if r.get("gpu_peak_bytes"):
            memory += f" (GPU {r['gpu_peak_bytes'] / 2**20:,.0f} MiB)"
        ref = references.get(r["case"])
        versus = agreement(r["picks"], by_case[ref]["picks"]) if ref in by_case else ""
        lines.append(
            f"| {r['case']} | {describe(r['case'], settings)} | {r['n']:,} | {r['labeled']:,} | "
            f"{r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {memory} | {ratio} | {versus} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="pool size (default 1,000,000)")
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--labeled", type=int, default=1000, help="labeled rows (evenly spaced)")
    parser.add_argument("--device", default="auto", help="device of the alselect cases: auto, cpu, cuda")
    parser.add_argument("--deepal-n", type=int, default=20_000, help="N of the N × N reference (4N² bytes)")
    parser.add_argument(
        "--cases", default=",".join(ALL_CASES), help=f"comma-separated: {', '.join(ALL_CASES)}"
    )
    parser.add_argument("--json", type=Path, help="also write every result (with picks) here")
    parser.add_argument("--data", type=Path, help="reuse/keep generated inputs in this folder")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = run_case(args.worker, args.data, json.loads(args.settings))
        print(json.dumps(result))
        return 0
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - set(ALL_CASES)
    if unknown:
        raise SystemExit(f"unknown cases: {', '.join(sorted(unknown))}")
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = {
        "n": args.n,
        "budget": args.budget,
        "labeled": args.labeled,
        "device": args.device,
        "deepal_n": args.deepal_n,
    }
    facts = machine()
    with tempfile.TemporaryDirectory() as scratch:
        data = args.data or Path(scratch)
        data.mkdir(parents=True, exist_ok=True)
        if not (data / "emb.npy").exists() or np.load(data / "emb.npy", mmap_mode="r").shape[0] < args.n:
            log(f"generating {args.n:,} × {DIMS} float16 embeddings in {data}")
            write_inputs(data, args.n)
        results = []
        for case in cases:
            log(f"case {case} ...")
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    case,
                    "--data",
                    str(data),
                    "--settings",
                    json.dumps(settings),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                log(done.stderr)
                raise SystemExit(f"case {case} failed")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            extra = (result["peak_extra_bytes"] or 0) / 2**20
            log(f"  {result['seconds']:.1f} s ({result['cpu_seconds']:.1f} CPU s), extra {extra:,.0f} MiB")
            results.append(result)
    facts["load_after"] = os.getloadavg()
    print(report(results, settings, facts))
    if args.json:
        args.json.write_text(
            json.dumps({"settings": settings, "machine": facts, "results": results}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
