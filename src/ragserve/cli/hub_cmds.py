"""`ragserve pull` and `ragserve models`: the hub side of the CLI (the work is in ragserve.hub)."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from ragserve.cli.common import HomeOption, console, fail, home_from

# Paragraphs, each joined onto one line: the help renderer keeps hard line breaks.
PULL_HELP = "\n\n".join(" ".join(paragraph.split()) for paragraph in (
    "Download a model from ModelScope or Hugging Face into the home's model store.",
    """MODEL_ID is ORG/NAME as the hub spells it (e.g. Qwen/Qwen3-Embedding-4B); prefix it with hf: or ms:
    to pick the hub inline. The hub is --source, else RAGSERVE_HUB, else ModelScope when its library is
    installed, else Hugging Face. Files land in <home>/models/<source>/<org>/<name>/, the libraries'
    caches in <home>/cache/.""",
    """Re-run the same command to resume an interrupted pull. Files are checked against the sizes and
    checksums the hub lists; a corrupted file is deleted and reported, and the next run fetches it again.""",
    """For a GGUF repo only one quantization is downloaded: choose it with --quant (e.g. Q4_K_M) or --file.""",
    """Mirrors and tokens use the libraries' own variables: HF_ENDPOINT, HF_TOKEN, MODELSCOPE_ENDPOINT,
    MODELSCOPE_API_TOKEN.""",
))


def register(app: typer.Typer) -> None:
    app.command("pull", help=PULL_HELP)(pull)
    app.command("models", help="List the models in the home's store with their sizes.")(models)


def pull(
    model_id: str = typer.Argument(..., help="Hub model ID, ORG/NAME (optionally hf:ORG/NAME or ms:ORG/NAME)."),
    source: Optional[str] = typer.Option(None, "--source", "-s",
                                         help="modelscope or huggingface (default: RAGSERVE_HUB, else "
                                              "modelscope if installed, else huggingface)."),
    revision: Optional[str] = typer.Option(None, "--revision", "-r",
                                           help="Branch, tag or commit (default: the repo's default branch)."),
    quant: Optional[str] = typer.Option(None, "--quant", "-q",
                                        help="GGUF repos: the quantization to download, e.g. Q4_K_M, Q5_K_M, Q8_0."),
    filename: Optional[str] = typer.Option(None, "--file", "-f",
                                           help="Download only this file of the repo (e.g. NAME.gguf)."),
    verify: bool = typer.Option(False, "--verify", help="Re-hash files already pulled, not only new ones."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    home: Optional[str] = HomeOption,
) -> None:
    from ragserve.hub import HubError, pull_model

    if quant and filename:
        fail("give either --quant or --file, not both")
    resolved_home = home_from(home)
    log = None if as_json else console.print
    try:
        path = pull_model(model_id, resolved_home, source=source, revision=revision, quant=quant,
                          filename=filename, progress=not (quiet or as_json), verify=verify, log=log)
    except HubError as exc:
        if as_json:
            typer.echo(json.dumps({"error": exc.message, "kind": exc.kind, "suggestions": exc.suggestions}))
            raise typer.Exit(1)
        fail(exc.message)
    except KeyboardInterrupt:
        fail("interrupted; partial files are kept: re-run the same `ragserve pull` to resume", code=130)
    if as_json:
        typer.echo(json.dumps({"model_id": model_id, "path": str(path)}))
    else:
        console.print(f"[green]Ready:[/] {path}")


def models(
    as_json: bool = typer.Option(False, "--json", help="Print the list as JSON."),
    home: Optional[str] = HomeOption,
) -> None:
    from ragserve.hub import list_store
    from ragserve.hub.pull import human_size

    resolved_home = home_from(home)
    stored = list_store(resolved_home)
    if as_json:
        typer.echo(json.dumps([m.to_dict() for m in stored], indent=2))
        return
    if not stored:
        console.print(f"No models in {resolved_home.models} yet; add one with `ragserve pull ORG/NAME`.")
        return
    table = Table(title=f"Models in {resolved_home.models}")
    for column in ("source", "model", "size", "files", "status", "folder"):
        table.add_column(column, justify="right" if column in ("size", "files") else "left",
                         overflow="fold")
    for m in stored:
        status = m.status_detail if not m.partial_size else f"{m.status} (+{human_size(m.partial_size)} partial)"
        model = m.model_id + "".join(f"\n  {name}" for name in m.gguf)
        try:
            where = str(m.path.relative_to(resolved_home.models))
        except ValueError:
            where = str(m.path)
        table.add_row(m.source, model, human_size(m.size), str(m.files), status, where)
    console.print(table)
    total = sum(m.size for m in stored)
    console.print(f"{len(stored)} model(s), {human_size(total)} in total")
    for m in stored:
        if m.problem:
            console.print(f"[yellow]{m.model_id}[/] changed since it was pulled; re-run `{m.repull}` to download "
                          "the files again", highlight=False)
