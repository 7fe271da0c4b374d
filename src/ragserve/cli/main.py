"""The `ragserve` command. Each command group lives in its own module and registers here."""

from __future__ import annotations

import importlib
import sys

import typer

app = typer.Typer(
    name="ragserve",
    help="Serve chat, embedding and rerank models for RAG apps over OpenAI- and Xinference-compatible HTTP.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Modules that define `register(app)`, with the commands each registers.
COMMAND_MODULES = {
    "ragserve.cli.server_cmds": ("serve", "stop"),
    "ragserve.cli.model_cmds": ("launch", "list", "terminate"),
    "ragserve.cli.hub_cmds": ("pull", "models"),
    "ragserve.cli.stack_cmds": ("up", "down"),
    "ragserve.cli.doctor_cmds": ("doctor",),
    "ragserve.cli.demo_cmds": ("check",),
}


@app.callback()
def _main() -> None:
    """Serve chat, embedding and rerank models for RAG apps over OpenAI- and Xinference-compatible HTTP."""


def _modules_for(argv: list[str]) -> list[str]:
    """Only the module of the command being run (the server starts sooner); all of them for help."""
    command = next((arg for arg in argv[1:] if not arg.startswith("-")), None)
    owners = [name for name, commands in COMMAND_MODULES.items() if command in commands]
    return owners or list(COMMAND_MODULES)


for _name in _modules_for(sys.argv):
    importlib.import_module(_name).register(app)


if __name__ == "__main__":
    app()
