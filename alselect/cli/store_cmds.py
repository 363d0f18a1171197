"""``gc``: housekeeping of the store's arrays."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from alselect.cli.app import app, examples, globals_of, reporter_for
from alselect.limits import MAX_KEEP_RUNS


@app.command(
    epilog=examples(
        ("see what would be freed, changing nothing", "alselect gc --dry-run"),
        ("keep only what the latest run used", "alselect gc --keep-runs 1"),
    )
)
def gc(
    ctx: typer.Context,
    keep_runs: Annotated[
        int, typer.Option(min=0, max=MAX_KEEP_RUNS, help="Keep the models the latest K runs used.")
    ] = 3,
    model: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", help="Also drop this model's arrays (name from 'status', or path)."),
    ] = None,
    drop_absent: Annotated[
        bool, typer.Option(help="Also drop arrays of images present in no folder and not labeled.")
    ] = False,
    dry_run: Annotated[bool, typer.Option(help="Say what would be dropped; change nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON.")] = False,
) -> None:
    """Free space: drop arrays no recent run used, compact the rest.

    Drops the arrays of models no recent run used, compacts the rest, reports the bytes freed.
    """
    from alselect.gc import collect
    from alselect.store import Store

    # a dry run only reads: it works on a store you cannot write to
    with Store.open(globals_of(ctx).store, write=not dry_run) as store, reporter_for(ctx) as reporter:
        result = collect(
            store,
            keep_runs=keep_runs,
            drop=model or [],
            drop_absent=drop_absent,
            dry_run=dry_run,
            reporter=reporter,
        )
    if as_json:
        payload = {
            "dropped_models": result.dropped_models,
            "compacted_models": result.compacted_models,
            "dropped_rows": result.dropped_rows,
            "orphan_files": result.orphan_files,
            "bytes_before": result.bytes_before,
            "bytes_after": result.bytes_after,
            "bytes_freed": result.freed,
            "dry_run": result.dry_run,
        }
        typer.echo(json.dumps(payload, indent=2))
        return
    verb = "would free" if dry_run else "freed"
    dropped = ", ".join(result.dropped_models) or "none"
    typer.echo(f"dropped models: {dropped} ({result.dropped_rows} image arrays)")
    if result.compacted_models:
        typer.echo(f"compacted:      {', '.join(result.compacted_models)}")
    if result.orphan_files:
        typer.echo(f"removed {result.orphan_files} leftover file(s) of interrupted runs")
    before, after = result.bytes_before / 1e6, result.bytes_after / 1e6
    typer.echo(f"{verb} {result.freed / 1e6:.1f} MB ({before:.1f} MB -> {after:.1f} MB)")
