"""The CLI's app object, consoles and error handling, shared by harness.cli.main (run, report, list, env)
and harness.cli.ci_commands (compare, check, export): both import this, neither imports the other's app."""

from __future__ import annotations

from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

from harness.errors import HarnessError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Benchmark quantized models: quality, size and speed in one run.")
console = Console()
err_console = Console(stderr=True)

EXIT_USER_ERROR = 2


@contextmanager
def user_errors():
    """HarnessError (and YAML/validation errors already turned into it) -> one line, exit 2."""
    try:
        yield
    except HarnessError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)  # [x] is text, not markup
        raise typer.Exit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt:
        err_console.print("interrupted: finished cells are saved; continue with --resume", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
