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
    """Check the stack end to end: chat, retrieval on a small knowledge base, rerank on vs off (hits@1 and MRR;
    a reranker that lowers them fails), a RAG answer."""
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
    style = {"ok": "[green]ok[/]", "WARN": "[yellow]WARN[/]", "FAIL": "[red]FAIL[/]"}
    for result in results:
        table.add_row(result.name, style[result.verdict], f"{result.seconds:.2f}", result.detail)
    console.print(table)
    failed = [r for r in results if not r.ok]
    warned = [r for r in results if r.ok and r.warning]
    if failed:
        console.print(f"[red]{len(failed)} step(s) failed[/]")
        raise typer.Exit(1)
    note = f" ({len(warned)} warning{'s' if len(warned) > 1 else ''}: see WARN above)" if warned else ""
    console.print(f"[green]all checks passed[/]{note}")


def register(app: typer.Typer) -> None:
    app.command()(check)
