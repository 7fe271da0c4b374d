"""Options and helpers shared by CLI commands."""

from __future__ import annotations

from typing import Optional

import typer

from ragserve.client import RagserveClient, ServerError, default_endpoint
from ragserve.settings import Home, resolve_home


class _LazyConsole:
    """rich's Console, made on first use, so that `ragserve serve` starts without importing rich."""

    def __init__(self, **options) -> None:
        self._options = options
        self._console = None

    def __getattr__(self, name: str):
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return getattr(self._console, name)


console = _LazyConsole()
err_console = _LazyConsole(stderr=True)

HomeOption = typer.Option(None, "--home", envvar="RAGSERVE_HOME",
                          help="Home folder for models, logs and state (default ~/.ragserve).")
EndpointOption = typer.Option(None, "--endpoint", "-e",
                              help="Server address, e.g. http://127.0.0.1:9997 (default: the running server).")
ApiKeyOption = typer.Option(None, "--api-key", envvar="RAGSERVE_API_KEY", help="API key of the server, if it has one.")


def home_from(option: Optional[str]) -> Home:
    return resolve_home(option)


def client_from(home: Home, endpoint: Optional[str], api_key: Optional[str] = None) -> RagserveClient:
    return RagserveClient(endpoint or default_endpoint(home), api_key=api_key)


def fail(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def run_or_fail(fn, *args, **kwargs):
    """Call a client method; turn a server error into a clear message and exit code 1."""
    try:
        return fn(*args, **kwargs)
    except ServerError as exc:
        fail(str(exc))
