"""The `ragserve` command. Each command group lives in its own module and registers here."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="ragserve",
    help="Serve chat, embedding and rerank models for RAG apps over OpenAI- and Xinference-compatible HTTP.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Modules that define `register(app)`; a missing one (not yet written) is skipped.
COMMAND_MODULES = (
    "ragserve.cli.server_cmds",
    "ragserve.cli.model_cmds",
    "ragserve.cli.hub_cmds",
    "ragserve.cli.stack_cmds",
    "ragserve.cli.doctor_cmds",
    "ragserve.cli.demo_cmds",
)

for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(_name)
    except ModuleNotFoundError as _exc:
        if _exc.name != _name:
            raise
        continue
    _module.register(app)


if __name__ == "__main__":
    app()
