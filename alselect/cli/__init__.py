"""Command-line entry point: the only place errors become messages and exit codes.

Exit codes: 0 success, 1 runtime error, 2 usage error, 3 nothing usable (no run recorded, nothing
labeled), 4 partial (``label``: some items were not matched; the rest was applied), 130 interrupted.
"""

from __future__ import annotations

import os
import sys
import traceback

import typer

from alselect.errors import AlselectError, OutputClosedError


def _discard_stdout() -> None:
    """The reader is gone: send what is still buffered for stdout to /dev/null, so that Python's
    final flush does not print a second, confusing error."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def register_commands() -> None:
    """Import every command module: each registers its commands on the app."""
    from alselect.cli import (  # noqa: F401
        info_cmds,
        model_cmds,
        output_cmds,
        preview_cmds,
        store_cmds,
        train_cmds,
    )


def main(argv: list[str] | None = None) -> None:
    register_commands()
    from alselect.cli.app import build_command, click_module, err, hoist_global_options, set_invocation

    args = list(sys.argv[1:] if argv is None else argv)
    set_invocation(args)
    verbose = "--verbose" in args or "-v" in args
    command = build_command(args)
    args = hoist_global_options(command, args)
    click = click_module().exceptions
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
        if isinstance(exc, OutputClosedError):
            _discard_stdout()
        if verbose:
            traceback.print_exc()
        err(f"alselect: error: {exc}")
        code = exc.exit_code
    except KeyboardInterrupt:
        err("alselect: interrupted")
        code = 130
    except Exception as exc:
        if verbose:
            traceback.print_exc()
        err(f"alselect: internal error: {type(exc).__name__}: {exc} (rerun with --verbose)")
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
