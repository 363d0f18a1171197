"""The Typer application, global options, help conventions, and the terminal reporter.

Every command gets, without doing anything itself (see ``build_command``):

- the global options ``--store``, ``--quiet`` and ``--verbose`` accepted after the command too
  (``hoist_global_options``);
- plain help that wraps at the terminal width (never truncated), with metavars such as ``N`` or
  ``PATH`` instead of type placeholders, and boolean flags without a ``--no-`` twin;
- ``{field}`` placeholders in help texts filled by ``help_field`` only when help is shown (so
  listing, say, the strategies costs nothing on a normal run).

A command adds examples with ``@app.command(epilog=examples(...))``.
"""

from __future__ import annotations

import contextlib
import io
import shlex
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, TextIO

import typer

from alselect import __version__
from alselect.progress import Reporter

EXIT_PARTIAL = 4  # label: what could be matched was applied; some items matched no image or several

app = typer.Typer(
    name="alselect",
    help="Pick which images to annotate next: embed a folder with your checkpoint, score it "
    "with an acquisition strategy, export a ranked list.\n\n"
    "Global options may also follow the command: alselect status --store PATH.",
    epilog="\b\nExamples:\n"
    "  alselect score photos/ --model model.pt --strategy entropy\n"
    "  alselect export --top 500 -o batch.csv\n"
    "  alselect label batch.csv\n"
    "  alselect COMMAND --help",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: wrapped at the terminal width, never cut off
    context_settings={"help_option_names": ["-h", "--help"]},
)


_ARGV: list[str] = []


def set_invocation(argv: list[str]) -> None:
    """Remember the arguments ``main`` was called with (for run records and sidecars)."""
    _ARGV[:] = argv


def command_line() -> str:
    """This invocation as a shell command line: ``alselect export --top 20 ...``."""
    return shlex.join(["alselect", *_ARGV])


@dataclass
class Globals:
    store: Path | None = None
    quiet: bool = False
    verbose: bool = False


def _version(value: bool) -> None:
    if value:
        typer.echo(f"alselect {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    store: Annotated[
        Path | None,
        typer.Option(
            "--store", envvar="ALSELECT_STORE", metavar="PATH", help="Store folder [default: .alselect]."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="More detail; tracebacks on errors.")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show version.")
    ] = False,
) -> None:
    # Options repeated after the command (see build_command) are applied to this object later.
    ctx.obj = Globals(store=store, quiet=quiet, verbose=verbose)


def globals_of(ctx: typer.Context) -> Globals:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Globals) else Globals()


# -- help conventions and global options after the command ----------------------------------------

_HELP_FIELDS: dict[str, Callable[[], str]] = {}
# Metavars by value type, for options that do not name their own.
_METAVARS = {int: "N", float: "X", Path: "PATH", "integer": "N", "float": "X", "path": "PATH"}
_GLOBAL_VALUE_OPTIONS = frozenset({"--store"})
_GLOBAL_OPTIONS = _GLOBAL_VALUE_OPTIONS | {"--quiet", "-q", "--verbose", "-v"}


def click_module() -> ModuleType:
    """The click that typer runs on: vendored as ``typer._click`` in recent typer, else click."""
    try:
        import typer._click as vendored

        return vendored
    except ImportError:
        import click

        return click


def examples(*items: tuple[str, str]) -> str:
    """A help epilog of ``(what it does, command line)`` pairs, kept verbatim (not re-wrapped)."""
    lines = ["\b", "Examples:"]
    for what, line in items:
        lines += [f"  # {what}", f"  {line}"]
    return "\n".join(lines)


def help_field(name: str, compute: Callable[[], str]) -> None:
    """Fill ``{name}`` in help texts with ``compute()``, called only when help is displayed."""
    _HELP_FIELDS[name] = compute


def build_command(args: list[str]) -> Any:
    """The click command tree of ``app`` with the conventions above applied."""
    command = typer.main.get_command(app)
    showing_help = any(arg in ("-h", "--help") for arg in args) or not args
    for sub in getattr(command, "commands", {}).values():
        for param in sub.params:
            _tidy_param(param)
        if showing_help:
            _fill_fields(sub)
    return command


def hoist_global_options(command: Any, args: list[str]) -> list[str]:
    """Move ``--store PATH``, ``--quiet`` and ``--verbose`` given after the command name before it.

    Click only accepts a group's options before the subcommand; users write them anywhere
    (``alselect score ... --quiet``). Values of the command's own options and everything after
    ``--`` are left alone, and a command that defines one of these names itself keeps it.
    """
    group_takes_value = _options_taking_values(command)
    position = 0
    while position < len(args) and args[position].startswith("-"):
        token = args[position]
        position += 2 if token in group_takes_value else 1
    commands = getattr(command, "commands", {})
    if position >= len(args) or args[position] not in commands:
        return args
    sub = commands[args[position]]
    own = {
        opt
        for param in sub.params
        for opt in (*getattr(param, "opts", ()), *getattr(param, "secondary_opts", ()))
    }
    takes_value = _options_taking_values(sub)
    moved: list[str] = []
    rest: list[str] = []
    tokens = iter(args[position + 1 :])
    for token in tokens:
        name = token.split("=", 1)[0]
        if token == "--":
            rest += [token, *tokens]
        elif name in _GLOBAL_OPTIONS and name not in own:
            moved.append(token)
            if name in _GLOBAL_VALUE_OPTIONS and "=" not in token:
                moved.append(next(tokens, ""))
        else:
            rest.append(token)
            if token in takes_value:
                rest.append(next(tokens, ""))
    return [*args[:position], *moved, args[position], *rest]


def _options_taking_values(command: Any) -> set[str]:
    names: set[str] = set()
    for param in command.params:
        flag = getattr(param, "is_flag", False) or getattr(param, "count", False)
        if param.param_type_name == "option" and not flag:
            names.update(param.opts)
    return names


def _tidy_param(param: Any) -> None:
    """Metavars instead of ``<type>`` placeholders; flags without a ``--no-`` twin or default."""
    if getattr(param, "is_flag", False) and not getattr(param, "count", False):
        if param.default is False:
            param.secondary_opts = []
        param.show_default = False
        return
    if param.metavar is None:
        param.metavar = param.name.upper() if param.param_type_name == "argument" else _metavar(param)
    if param.param_type_name == "argument":
        # Plain 'DIR' in the usage line and help, as in click (some typer versions print '{dir}').
        name, record = param.metavar, param.get_help_record

        def help_record(ctx: Any) -> tuple[str, str] | None:
            found = record(ctx)
            return None if found is None else (name, found[1])

        param.get_usage_pieces = lambda _ctx: [name]
        param.get_help_record = help_record


def _metavar(param: Any) -> str:
    """``N``, ``X``, ``PATH`` or ``TEXT`` from the option's type (click's or typer's description)."""
    click_type = getattr(param, "type", None)
    if click_type is not None:
        return _METAVARS.get(click_type.name.removesuffix(" range"), "TEXT")
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    return _METAVARS.get(annotation, "TEXT")


def _fill_fields(command: Any) -> None:
    def fill(text: str | None) -> str | None:
        if not text:
            return text
        for name, compute in _HELP_FIELDS.items():
            if "{" + name + "}" in text:
                text = text.replace("{" + name + "}", compute())
        return text

    command.help = fill(command.help)
    command.epilog = fill(command.epilog)
    for param in command.params:
        if hasattr(param, "help"):
            param.help = fill(param.help)


@contextlib.contextmanager
def data_stdout() -> Iterator[TextIO]:
    """stdout for data: UTF-8, no newline translation, and file names that are not UTF-8 written
    with their original bytes (as ``ls`` does). Detached afterwards, so stdout stays open."""
    with contextlib.suppress(ValueError, OSError):
        sys.stdout.flush()  # text written before keeps its place
    stream = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", errors="surrogateescape", newline="")
    try:
        yield stream
        stream.flush()  # a full disk or a closed pipe is this command's error, not a silent success
    finally:
        with contextlib.suppress(ValueError, OSError):
            stream.flush()
        with contextlib.suppress(ValueError):
            stream.detach()


def err(message: str) -> None:
    """One line to stderr."""
    sys.stderr.write(message.rstrip("\n") + "\n")
    sys.stderr.flush()


class TerminalReporter(Reporter):
    """Progress bars on a terminal only; info unless quiet; warnings always; all on stderr."""

    def __init__(self, quiet: bool, verbose: bool) -> None:
        self.quiet = quiet
        self.verbose = verbose
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}
        if not quiet and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description:>6}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._progress.start()

    def progress(self, stage: str, done: int, total: int | None) -> None:
        if self._progress is None:
            return
        if stage not in self._tasks:
            self._tasks[stage] = self._progress.add_task(stage, total=total)
        self._progress.update(self._tasks[stage], completed=done, total=total)

    def info(self, message: str) -> None:
        if not self.quiet:
            self._print(message)

    def warning(self, message: str) -> None:
        self._print(f"warning: {message}")

    def _print(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message, markup=False, highlight=False)
        else:
            err(message)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> TerminalReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reporter_for(ctx: typer.Context) -> TerminalReporter:
    options = globals_of(ctx)
    return TerminalReporter(options.quiet, options.verbose)
