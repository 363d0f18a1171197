"""``status`` and ``strategies``: read-only views, printed to stdout (``--json`` for scripts)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from alselect.cli.app import app, globals_of

SHOWN_CLASSES = 20  # per-class label counts in the text view; --json has them all
Json = Annotated[bool, typer.Option("--json", help="Machine-readable JSON.")]


@app.command()
def status(
    ctx: typer.Context,
    as_json: Json = False,
    failed: Annotated[bool, typer.Option("--failed", help="List every failed image.")] = False,
) -> None:
    """What the store holds: images, failures, models, runs, labels, exports."""
    from alselect.status import store_status
    from alselect.store import Store

    with Store.open(globals_of(ctx).store) as store:
        info = store_status(store, list_failed=failed)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(_format_status(info))


def _format_status(info: dict[str, Any]) -> str:
    images = info["images"]
    lines = [
        f"store:     {info['store']}",
        f"images:    {images['present']} present, {images['absent']} absent, {images['failed']} failed",
    ]
    for reason, count in info["failed_reasons"].items():
        lines.append(f"  failed:  {count} {reason}")
    for model in info["models"]:
        lines.append(
            f"model:     {model['model']} {model['kind']} ({model['classes']} classes, "
            f"{model['dim']}-d) {model['embedded']} embedded"
            + (f", {model['failed']} failed" if model["failed"] else "")
            + f"  {model['checkpoint']}"
        )
    lines.append(f"runs:      {info['runs']}")
    run = info["latest_run"]
    if run:
        lines.append(
            f"latest:    run {run['id']} {run['strategy']} at {run['created_at']}, "
            f"{run['selected']} ranked of {run['pool_size']}"
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
    for item in info.get("failed_images", []):
        lines.append(f"{item['folder']}/{item['path']}\t{item['reason']}")
    return "\n".join(lines)


@app.command()
def strategies(as_json: Json = False) -> None:
    """List acquisition strategies: name, what they need, one-line summary."""
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
