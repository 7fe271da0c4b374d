"""`ragserve check`: the end-to-end check of a running stack."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from ragserve.cli.common import ApiKeyOption, EndpointOption, HomeOption, console, home_from
from ragserve.client import default_endpoint


def check(
    chat: Optional[str] = typer.Option(None, "--chat", help="Chat model UID (default: the first LLM running)."),
    embedding: Optional[str] = typer.Option(None, "--embedding", help="Embedding model UID (default: the first)."),
    rerank: Optional[str] = typer.Option(None, "--rerank", help="Rerank model UID (default: the first)."),
    endpoint: Optional[str] = EndpointOption,
    api_key: Optional[str] = ApiKeyOption,
    home_opt: Optional[str] = HomeOption,
) -> None:
    """Check the stack end to end: chat, retrieval on a small knowledge base, rerank on vs off, a RAG answer."""
    from ragserve.control.e2e_check import run_check

    home = home_from(home_opt)
    url = endpoint or default_endpoint(home)
    with console.status("checking ..."):
        try:
            results = run_check(url, chat, embedding, rerank, api_key)
        except Exception as exc:
            console.print(f"[bold red]error:[/] cannot check {url}: {exc}. Is the server running (`ragserve serve`)?")
            raise typer.Exit(1)
    table = Table("Step", "Result", "Seconds", "Detail", show_lines=True)
    for result in results:
        table.add_row(result.name, "[green]ok[/]" if result.ok else "[red]FAIL[/]", f"{result.seconds:.2f}",
                      result.detail)
    console.print(table)
    failed = [r for r in results if not r.ok]
    if failed:
        console.print(f"[red]{len(failed)} step(s) failed[/]")
        raise typer.Exit(1)
    console.print("[green]all checks passed[/]")


def register(app: typer.Typer) -> None:
    app.command()(check)
