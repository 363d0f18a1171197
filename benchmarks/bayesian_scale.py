"""Bayesian strategies at scale: BALD over a large pool and BatchBALD over a prefilter, side by side
with batchbald_redux (or a plain numpy/torch reference when it cannot be imported).

Prints machine facts and Markdown tables to stdout; progress goes to stderr. See README.md.

    python benchmarks/bayesian_scale.py [--n 1000000] [--passes 20] [--classes 10]
        [--budget 100] [--prefilter 10000] [--num-samples 10000] [--device cpu|cuda|auto]
        [--reference-budget N] [--repeats 3] [--json results.json]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from embed_throughput import machine_facts, summary, synchronize

from alselect.embed import resolve_device
from alselect.strategies import PoolInputs, make_strategy
from alselect.strategies.batchbald import GAIN_FLOOR, batchbald, joint_gains
from alselect.strategies.bayesian import bald

EMBED_DIMS = 64
ROWS_PER_CHUNK = 65_536


def log(message: str) -> None:
    """Progress and notes: stderr only, so stdout stays a clean Markdown report."""
    print(message, file=sys.stderr, flush=True)


def mc_dropout_pool(n: int, passes: int, classes: int, seed: int, dtype: type) -> np.ndarray:
    """``[n, passes, classes]`` probabilities shaped like consistent MC dropout, row by row seeded.

    Dropout (p = 0.5, the same ``passes`` masks for every image) on a random ``EMBED_DIMS``-d
    embedding before a random linear head, then softmax: passes are correlated across images, as
    with a real network, and their disagreement varies from image to image.
    """
    rng = np.random.default_rng(seed)
    head = (rng.standard_normal((EMBED_DIMS, classes)) * 3.0 / math.sqrt(EMBED_DIMS)).astype(np.float32)
    masks = ((rng.random((passes, EMBED_DIMS)) < 0.5) * 2.0).astype(np.float32)
    out = np.empty((n, passes, classes), dtype=dtype)
    for start in range(0, n, ROWS_PER_CHUNK):
        rows = min(ROWS_PER_CHUNK, n - start)
        embedding = np.random.default_rng([seed, start]).standard_normal((rows, EMBED_DIMS), dtype=np.float32)
        for t in range(passes):
            logits = (embedding * masks[t]) @ head
            logits -= logits.max(axis=1, keepdims=True)
            probs = np.exp(logits)
            probs /= probs.sum(axis=1, keepdims=True)
            out[start : start + rows, t] = probs
    return out


def timed(run: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    synchronize(device)
    start = time.perf_counter()
    result = run()
    synchronize(device)
    return time.perf_counter() - start, result


def load_reference() -> Any | None:
    """batchbald_redux's ``batchbald`` module, or None (then the plain reference is used)."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # its progress bars would flood stderr
    try:
        return importlib.import_module("batchbald_redux.batchbald")
    except Exception as exc:  # any import failure: missing package, or a torch it cannot run with
        log(f"batchbald_redux not usable ({type(exc).__name__}: {exc}); using the plain reference")
        return None


def plain_bald(log_probs: torch.Tensor) -> torch.Tensor:
    """Straightforward BALD ``H[p̄] − mean_t H[p_t]`` in float64 on whatever device holds the input."""
    out = []
    for chunk in log_probs.split(ROWS_PER_CHUNK):
        probs = chunk.double().exp()
        mean = probs.mean(dim=1)
        entropy_of_mean = -(torch.special.xlogy(mean, mean)).sum(dim=1)
        expected_entropy = -(torch.special.xlogy(probs, probs)).sum(dim=2).mean(dim=1)
        out.append(entropy_of_mean - expected_entropy)
    return torch.cat(out)


def redux_bald(module: Any, log_probs: torch.Tensor) -> np.ndarray:
    """batchbald_redux's BALD of every row (``get_bald_batch`` returns them in top-k order)."""
    n = log_probs.shape[0]
    batch = module.get_bald_batch(log_probs, n)
    scores = np.empty(n)
    scores[np.asarray(batch.indices)] = batch.scores
    return scores


def reference_batchbald(
    module: Any | None, log_probs: torch.Tensor, budget: int, num_samples: int
) -> list[int]:
    if module is None:
        raise SystemExit(
            "the BatchBALD reference needs batchbald_redux: pip install --no-deps batchbald_redux"
        )
    batch = module.get_batchbald_batch(
        log_probs, budget, num_samples, dtype=torch.double, device=log_probs.device
    )
    return [int(i) for i in batch.indices]


def repeat_timing(
    name: str, repeats: int, run: Callable[[], Any], device: torch.device
) -> tuple[list[float], Any]:
    """Seconds of each of ``repeats`` runs, and the last run's result."""
    seconds, result = [], None
    for repeat in range(repeats):
        log(f"{name}, repeat {repeat + 1}/{repeats}")
        elapsed, result = timed(run, device)
        seconds.append(elapsed)
    return seconds, result


def measure_bald(
    args: argparse.Namespace, mc: np.ndarray, device: torch.device, module: Any | None
) -> dict[str, Any]:
    n = mc.shape[0]
    inputs = PoolInputs(probs=mc[:, 0], labeled=np.zeros(n, dtype=bool), mc_probs=mc)
    strategy = make_strategy("bald")
    ours, scores = repeat_timing("BALD scores, ours", args.repeats, lambda: bald(mc), device)
    ranked, selection = repeat_timing(
        "BALD strategy, ours", args.repeats, lambda: strategy.select(None, inputs), device
    )
    half_input = mc.astype(np.float16)
    half, half_scores = repeat_timing(
        "BALD scores, float16, ours", args.repeats, lambda: bald(half_input), device
    )
    log_probs = torch.from_numpy(np.log(mc)).to(device)  # the references' input: log probabilities
    plain, plain_scores = repeat_timing(
        "BALD, plain torch reference", args.repeats, lambda: plain_bald(log_probs).cpu().numpy(), device
    )
    redux: dict[str, Any] = {}
    rows = min(n, args.redux_bald_rows)
    if module is not None and rows > 0:
        seconds, redux_scores = repeat_timing(
            f"BALD, batchbald_redux, {rows} rows", 1, lambda: redux_bald(module, log_probs[:rows]), device
        )
        redux = {
            "rows": rows,
            "seconds": seconds[0],
            "max_abs_difference": float(np.max(np.abs(scores[:rows] - redux_scores))),
        }
    top = min(1000, n)
    ours_top = set(selection.indices[:top].tolist())
    reference_top = set(np.argsort(-plain_scores, kind="stable")[:top].tolist())
    return {
        "ours_score_s": ours,
        "ours_select_s": ranked,
        "ours_float16_score_s": half,
        "reference_s": plain,
        "max_abs_difference": float(np.max(np.abs(scores - plain_scores))),
        "redux": redux,
        "max_abs_difference_float16": float(np.max(np.abs(half_scores - scores))),
        "top1000_overlap": len(ours_top & reference_top) / top,
        "negative_scores": int(np.count_nonzero(scores < 0)),
    }


def measure_batchbald(
    args: argparse.Namespace, mc: np.ndarray, device: torch.device, module: Any | None
) -> dict[str, Any]:
    n = mc.shape[0]
    excluded = np.zeros(n, dtype=bool)
    scores = bald(mc)

    def ours_run(budget: int) -> Any:
        return batchbald(
            mc,
            excluded,
            budget,
            num_samples=args.num_samples,
            prefilter=args.prefilter,
            seed=args.seed,
            device=str(device),
            bald_scores=scores,
        )

    log(f"BatchBALD, ours: {args.budget} from the top {args.prefilter} by BALD")
    seconds, ours = timed(lambda: ours_run(args.budget), device)
    log(f"BatchBALD, ours, first {args.reference_budget} picks")
    short_seconds, short = timed(lambda: ours_run(args.reference_budget), device)
    # The reference runs on the same candidates: the prefilter, in row order.
    candidates = np.sort(np.argsort(-scores, kind="stable")[: args.prefilter])
    log_probs = torch.from_numpy(np.log(mc[candidates].astype(np.float64))).to(device)
    torch.manual_seed(args.seed)
    log(f"BatchBALD, reference: {args.reference_budget} picks")
    reference_seconds, positions = timed(
        lambda: reference_batchbald(module, log_probs, args.reference_budget, args.num_samples), device
    )
    reference = candidates[positions].tolist()
    compared = ours.indices[: len(reference)].tolist()
    informative = int(np.count_nonzero(ours.gains[: len(reference)] >= GAIN_FLOOR))
    differ = [i for i, (a, b) in enumerate(zip(compared, reference, strict=True)) if a != b]
    check = {}
    if args.exact_check and differ:
        check = exact_check(args, mc, scores, ours.indices.tolist(), reference, differ[0], device)
    return {
        "exact_check": check,
        "ours_s": seconds,
        "ours_short_s": short_seconds,
        "reference_s": reference_seconds,
        "ours_picks": ours.indices.tolist(),
        "ours_gains": ours.gains.tolist(),
        "reference_picks": reference,
        "exact_steps": ours.exact_steps,
        "informative_picks": int(np.count_nonzero(ours.gains >= GAIN_FLOOR)),
        "evaluations": ours.evaluations,
        "candidates": ours.candidates,
        "compared_picks": len(reference),
        "same_prefix": differ[0] if differ else len(reference),
        "overlap": len(set(compared) & set(reference)),
        "informative_compared": informative,
        "informative_overlap": len(set(compared[:informative]) & set(reference[:informative])),
        "short_same_as_long": short.indices.tolist() == ours.indices[: args.reference_budget].tolist(),
    }


def exact_check(
    args: argparse.Namespace,
    mc: np.ndarray,
    scores: np.ndarray,
    ours: list[int],
    reference: list[int],
    step: int,
    device: torch.device,
) -> dict[str, Any]:
    """At the first pick where ours and the reference differ: the exact greedy pick, and the exact
    gains of all three, by enumerating every label configuration of the common prefix."""
    configurations = args.classes**step
    if configurations > args.exact_samples:
        log(f"exact check skipped: {configurations:,} configurations > --exact-samples")
        return {}
    log(f"exact check at pick {step + 1}: {configurations:,} configurations")
    excluded = np.zeros(mc.shape[0], dtype=bool)
    exact = batchbald(
        mc,
        excluded,
        step + 1,
        num_samples=args.exact_samples,
        prefilter=args.prefilter,
        device=str(device),
        bald_scores=scores,
    )
    if exact.indices[:step].tolist() != ours[:step]:
        return {"step": step, "note": "the exact greedy differs before this step"}
    rows = [ours[step], reference[step], int(exact.indices[step])]
    gains = joint_gains(mc[ours[:step]], mc[rows], num_samples=args.exact_samples, device=str(device))
    return {"step": step, "ours": gains[0], "reference": gains[1], "exact_greedy": gains[2], "rows": rows}


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    stats = summary(values)
    return f"{stats['median']:.2f} ({stats['min']:.2f}–{stats['max']:.2f})"


def exact_lines(check: dict[str, Any]) -> list[str]:
    if "ours" not in check:
        return []
    return [
        f"At pick {check['step'] + 1}, the first where they differ, exact gains (every configuration of "
        f"the first {check['step']} picks enumerated): the exact greedy's pick {check['exact_greedy']:.6f} "
        f"nats, ours {check['ours']:.6f}, the reference's {check['reference']:.6f}."
    ]


def redux_row(redux: dict[str, Any], device: str) -> list[str]:
    if not redux:
        return []
    return [
        f"| batchbald_redux `get_bald_batch`, first {redux['rows']:,} images only ({device}; "
        f"largest difference from ours {redux['max_abs_difference']:.1e}) | {redux['seconds']:.2f} |"
    ]


def markdown(
    facts: dict[str, Any], settings: dict[str, Any], ball: dict[str, Any], bb: dict[str, Any]
) -> str:
    """The stdout report: machine, settings, a BALD table and a BatchBALD table."""
    ref, dev, dtype = settings["reference"], settings["device"], settings["dtype"]
    n, budget, compared = settings["n"], settings["budget"], bb["compared_picks"]
    informative = bb["informative_compared"]
    lines = [
        "## Bayesian strategies at scale",
        "",
        f"Machine: {facts['cpu']} ({facts['cpus_usable']} usable of {facts['cpu_count']} CPUs), "
        f"device {facts['device']} ({facts['device_name']}); torch {facts['torch']} "
        f"({facts['torch_threads']} threads), numpy {facts['numpy']}, Python {facts['python']}. "
        f"Load average before: {settings['load_before']}, after: {settings['load_after']}.",
        "",
        f"Pool: {n:,} images, T = {settings['passes']} passes, C = {settings['classes']} classes, "
        f"{dtype} (MC-dropout-like synthetic probabilities), seed {settings['seed']}.",
        "",
        f"### BALD over {n:,} images (seconds, median (min–max) of {settings['repeats']})",
        "",
        "| what | seconds |",
        "|---|---:|",
        f"| ours: `bald()` scores, {dtype} input (numpy, CPU) | {fmt(ball['ours_score_s'])} |",
        f"| ours: `bald` strategy, scores + full ranking | {fmt(ball['ours_select_s'])} |",
        f"| ours: `bald()` scores, float16 input | {fmt(ball['ours_float16_score_s'])} |",
        f"| reference: plain torch float64 on log-probabilities ({dev}) | {fmt(ball['reference_s'])} |",
        *redux_row(ball["redux"], dev),
        "",
        f"Largest |ours − reference|: {ball['max_abs_difference']:.2e} nats; float16 vs {dtype} input: "
        f"{ball['max_abs_difference_float16']:.2e}; top-1000 overlap {ball['top1000_overlap']:.1%}; "
        f"negative scores: {ball['negative_scores']}.",
        "",
        f"### BatchBALD: {budget} picks from the top {settings['prefilter']:,} by BALD "
        f"(M = {settings['num_samples']:,})",
        "",
        "| what | picks | seconds |",
        "|---|---:|---:|",
        f"| ours (greedy, given the BALD scores; {dev}) | {budget} | {bb['ours_s']:.2f} |",
        f"| ours, first picks only | {compared} | {bb['ours_short_s']:.2f} |",
        f"| reference: {ref} `get_batchbald_batch` ({dev}) | {compared} | {bb['reference_s']:.2f} |",
        "",
        f"Ours: {bb['exact_steps']} picks with the exact joint, {bb['informative_picks']} with a gain ≥ "
        f"{GAIN_FLOOR:g} nats (the rest follow BALD order), {bb['evaluations']:,} full candidate gains "
        f"(evaluating every candidate at every step would be {bb['candidates'] * budget:,}).",
        f"Picks compared with the reference: {compared}; identical prefix {bb['same_prefix']}; same set "
        f"{bb['overlap']}/{compared}; among the {informative} informative ones "
        f"{bb['informative_overlap']}/{informative}.",
        *exact_lines(bb["exact_check"]),
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="pool size for BALD and BatchBALD")
    parser.add_argument("--passes", type=int, default=20, help="T, MC-dropout passes")
    parser.add_argument("--classes", type=int, default=10, help="C")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="mc_probs dtype")
    parser.add_argument("--budget", type=int, default=100, help="BatchBALD picks")
    parser.add_argument("--prefilter", type=int, default=10_000, help="BatchBALD candidates (top by BALD)")
    parser.add_argument("--num-samples", type=int, default=10_000, help="M, BatchBALD configurations")
    parser.add_argument(
        "--reference-budget", type=int, default=None, help="picks asked of the reference [default: --budget]"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto: BatchBALD and the references")
    parser.add_argument("--repeats", type=int, default=3, help="BALD timings (BatchBALD runs once)")
    parser.add_argument(
        "--redux-bald-rows", type=int, default=100_000, help="rows given to batchbald_redux's BALD (0: skip)"
    )
    parser.add_argument(
        "--exact-check",
        action="store_true",
        help="where the picks first differ, compute the exact gains (needs C^step ≤ --exact-samples)",
    )
    parser.add_argument(
        "--exact-samples", type=int, default=1_000_000, help="configurations for --exact-check"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write raw numbers here")
    args = parser.parse_args(argv)
    if args.reference_budget is None:
        args.reference_budget = args.budget
    args.reference_budget = min(args.reference_budget, args.budget)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    module = load_reference()
    reference = "plain torch"
    if module is not None:
        reference = f"batchbald_redux {importlib.metadata.version('batchbald_redux')}"
    log(f"generating {args.n:,} × {args.passes} × {args.classes} probabilities")
    mc = mc_dropout_pool(args.n, args.passes, args.classes, args.seed, np.dtype(args.dtype).type)
    bald_result = measure_bald(args, mc, device, module)
    bb = measure_batchbald(args, mc, device, module)
    settings = {
        **{k: v for k, v in vars(args).items() if k != "json"},
        "device": str(device),
        "reference": reference,
        "load_before": load_before,
        "load_after": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    facts = machine_facts(device)
    print(markdown(facts, settings, bald_result, bb))
    if args.json:
        payload = {"machine": facts, "settings": settings, "bald": bald_result, "batchbald": bb}
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    log(f"median BALD scores: {statistics.median(bald_result['ours_score_s']):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
