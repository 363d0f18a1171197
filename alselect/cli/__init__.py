"""Command-line entry point: the only place errors become messages and exit codes.

Exit codes: 0 success, 1 runtime error, 2 usage error, 3 nothing usable (no run recorded, nothing
labeled), 4 partial (``label``: some items were not matched; the rest was applied), 130 interrupted.
A reader of stdout that goes away (broken pipe, ``| head -1``) ends a command quietly with status 1
(click's convention), except ``export``, which says in one line that nothing was recorded.
"""

from __future__ import annotations

import errno
import io
import os
import sys
import traceback

import typer

from alselect.errors import AlselectError, OutputClosedError

_STREAM_ERRORS = (errno.ENOSPC, errno.EIO, errno.EBADF, errno.EDQUOT, errno.EFBIG)


class _ClosedStream(io.RawIOBase):
    """Stands in for a closed stdout (``alselect status >&-``): every write fails with EBADF, which
    ``main`` turns into one error line, instead of Python's ``None`` stdout failing anywhere."""

    def writable(self) -> bool:
        return True

    def write(self, data: object) -> int:
        raise OSError(errno.EBADF, "stdout is closed")


def _ensure_stdout() -> None:
    if sys.stdout is None:
        sys.stdout = io.TextIOWrapper(io.BufferedWriter(_ClosedStream()), encoding="utf-8")


def _discard_stdout() -> None:
    """The output is gone: send what is still buffered for stdout to /dev/null, so that Python's
    final flush does not print a second, confusing error."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # a stand-in without a descriptor
        sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.BytesIO()), encoding="utf-8")


def _stdout_failure(exc: BaseException) -> int | None:
    """The exit status for a failed write to stdout (``None``: ``exc`` is not one). A reader that
    went away (EPIPE) ends the command quietly; a full device, an I/O error or a closed stdout is
    one error line and status 1. Files are written through ``atomic_output``, whose errors are
    ``AlselectError``s, so an ``OSError`` that reaches ``main`` comes from a standard stream."""
    if isinstance(exc, BrokenPipeError) or (isinstance(exc, OSError) and exc.errno == errno.EPIPE):
        _discard_stdout()
        return 1
    if isinstance(exc, OSError) and exc.errno in _STREAM_ERRORS:
        _discard_stdout()
        from alselect.cli.app import err

        err(f"alselect: error: cannot write to stdout: {exc.strerror or exc}; the output is incomplete")
        return 1
    return None


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
    _ensure_stdout()
    from alselect.cli.app import build_command, click_module, err, hoist_global_options, set_invocation

    args = list(sys.argv[1:] if argv is None else argv)
    set_invocation(args)
    verbose = "--verbose" in args or "-v" in args
    command = build_command(args)
    args = hoist_global_options(command, args)
    click = click_module().exceptions
    try:
        code = command.main(args=args, prog_name="alselect", standalone_mode=False)
        sys.stdout.flush()  # data printed with typer.echo: its write errors are this command's errors
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
        failed = _stdout_failure(exc)
        if failed is not None:
            if verbose:
                traceback.print_exc()
            sys.exit(failed)
        if verbose:
            traceback.print_exc()
        err(f"alselect: internal error: {type(exc).__name__}: {exc} (rerun with --verbose)")
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
