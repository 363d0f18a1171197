"""Command-line entry point: the only place errors become messages and exit codes.

Exit codes: 0 success, 1 runtime error, 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import os
import sys
import traceback
from types import ModuleType

import typer

from alselect.errors import AlselectError


def _click_exceptions() -> ModuleType:
    """The click that typer runs on: vendored as ``typer._click`` since typer 0.20-ish."""
    try:
        import typer._click.exceptions as vendored

        return vendored
    except ImportError:
        import click.exceptions as upstream

        return upstream


def main(argv: list[str] | None = None) -> None:
    from alselect.cli import info_cmds, model_cmds, output_cmds, train_cmds  # noqa: F401  (register commands)
    from alselect.cli.app import app, err

    args = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in args or "-v" in args
    command = typer.main.get_command(app)
    click = _click_exceptions()
    try:
        code = command.main(args=args, prog_name="alselect", standalone_mode=False)
    except typer.Exit as exc:
        code = exc.exit_code
    except typer.Abort:
        err("alselect: interrupted")
        code = 130
    except click.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare 'alselect': the help text
            err(exc.format_message())
        else:
            err(f"alselect: error: {exc.format_message()}")
        code = 2
    except click.ClickException as exc:
        err(f"alselect: error: {exc.format_message()}")
        code = exc.exit_code
    except AlselectError as exc:
        if verbose:
            traceback.print_exc()
        err(f"alselect: error: {exc}")
        code = exc.exit_code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        err("alselect: error: output closed early; nothing was recorded")
        code = 1
    except KeyboardInterrupt:
        err("alselect: interrupted")
        code = 130
    except Exception as exc:
        if verbose:
            traceback.print_exc()
        err(f"alselect: internal error: {type(exc).__name__}: {exc} (rerun with --verbose)")
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
