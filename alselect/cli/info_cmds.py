"""``status`` and ``strategies``: read-only views, printed to stdout (``--json`` for scripts)."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

import typer

from alselect.cli.app import app, data_stdout, examples, globals_of

SHOWN_CLASSES = 20  # per-class label counts in the text view; --json has them all
Json = Annotated[bool, typer.Option("--json", help="Machine-readable JSON.")]


@app.command(
    epilog=examples(
        ("counts per folder, models, the latest run", "alselect status"),
        ("every image that could not be used, and why", "alselect status --failed"),
        ("the same for scripts", "alselect status --json"),
    )
)
def status(
    ctx: typer.Context,
    as_json: Json = False,
    failed: Annotated[bool, typer.Option("--failed", help="List every failed image.")] = False,
) -> None:
    """Show what the store holds: images, models, runs, exports.

    Reads the store only, so it works on a store you cannot write to.
    """
    from alselect.status import store_status
    from alselect.store import Store

    with Store.open(globals_of(ctx).store) as store:
        info = store_status(store, list_failed=failed)
    with data_stdout() as stdout:
        stdout.write((json.dumps(info, indent=2) if as_json else _format_status(info)) + "\n")


def _format_status(info: dict[str, Any]) -> str:
    from alselect.status import describe_files

    images = info["images"]
    run = info["latest_run"]
    lines = [f"store:     {info['store']}" + ("  (read-only for you)" if info["read_only"] else "")]
    lines.append(f"files:     {describe_files(images)}")
    for folder in info["folders"]:
        latest = "  (latest run)" if run and folder["folder"] == run["folder"] else ""
        lines.append(f"folder:    {folder['folder']}{latest}")
        lines.append(f"  files:   {describe_files(folder)}")
    for reason, count in info["failed_reasons"].items():
        lines.append(f"  failed:  {count} {reason}")
    for model in info["models"]:
        lines.append(
            f"model:     {model['model']} {model['kind']} ({describe_model(model)}) "
            f"{model['embedded']} embedded"
            + (f", {model['failed']} failed" if model["failed"] else "")
            + f"  {model['checkpoint']}"
        )
    lines.append(f"runs:      {info['runs']}")
    if run:
        lines.append(
            f"latest:    run {run['id']} {run['strategy']} at {run['created_at']} on {run['folder']}: "
            f"ranked {run['selected']} of {run['pool_size']} image(s) ({run['labeled']} labeled); "
            f"{run['unexported']} still to export"
        )
    classes = info["label_classes"]
    with_class = sum(classes.values())
    lines.append(
        f"labeled:   {info['labeled']}"
        + (f" ({with_class} with a class, {info['labeled'] - with_class} without)" if classes else "")
    )
    for name, count in list(classes.items())[:SHOWN_CLASSES]:
        lines.append(f"  class:   {count} {name}")
    if len(classes) > SHOWN_CLASSES:
        lines.append(f"  class:   ... {len(classes) - SHOWN_CLASSES} more (--json lists all)")
    lines.append(f"exported:  {info['exported']} image(s) in {info['exports']} export(s)")
    for item in info.get("failed_images", []):  # one line each: control characters escaped
        lines.append(f"{one_line(item['folder'] + '/' + item['path'])}\t{one_line(item['reason'] or '')}")
    for item in info.get("failed_outputs", []):
        reason = f"model {item['model']}: {item['reason']}"
        lines.append(f"{one_line(item['folder'] + '/' + item['path'])}\t{one_line(reason)}")
    return "\n".join(lines)


_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")


def one_line(text: str) -> str:
    """``text`` without line breaks, tabs or other control characters: each as a C-style escape
    (``\\n``, ``\\t``, ``\\x1b``; a backslash doubled), so one failed file is one line. Bytes of a
    name that are not UTF-8 are kept as they are, as ``ls`` shows them."""
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
    return _CONTROL.sub(lambda m: named.get(m.group(), f"\\x{ord(m.group()):02x}"), text)


@app.command(
    epilog=examples(
        ("names, what each needs, what its score means", "alselect strategies"),
        ("the same for scripts", "alselect strategies --json"),
    )
)
def strategies(as_json: Json = False) -> None:
    """List the acquisition strategies for 'score --strategy'."""
    from alselect.strategies import available

    rows = [
        {
            "name": name,
            "needs": sorted(cls.needs),
            "summary": cls.summary,
            "score": cls.score_meaning,
        }
        for name, cls in available().items()
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        needs = ",".join(r["needs"]) or "-"
        typer.echo(f"{r['name']:<{width}}  {needs:<10}  {r['summary']}")


def describe_model(model: dict[str, Any]) -> str:
    """``10 classes, 128-d, bf16`` (``128-d float16`` for embeddings stored as float16); stored
    MC-dropout samples say so instead of a dimension."""
    parts = [f"{model['classes']} classes"]
    if model.get("mc_samples"):
        parts.append(f"{model['mc_samples']} MC-dropout samples per image")
    elif model["dim"] is not None:
        narrow = " float16" if model.get("embedding_dtype") == "float16" else ""
        parts.append(f"{model['dim']}-d{narrow}")
    else:
        parts.append("no embedding")
    parts.append(model.get("precision") or "fp32")
    return ", ".join(parts)
