"""`ragserve launch`, `list` and `terminate`: the same flags as `xinference launch`."""

from __future__ import annotations

import os
from typing import Any, Optional

import typer
from rich.table import Table

from ragserve.cli.common import (ApiKeyOption, EndpointOption, HomeOption, client_from, console, fail, home_from,
                                 run_or_fail)


def _parse_extra(args: list[str]) -> dict[str, Any]:
    """Xinference passes engine kwargs as extra `--key value` flags; keep them as engine options."""
    options: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            fail(f"unexpected argument {arg!r}: engine options are written --key value")
        key = arg[2:].replace("-", "_")
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
            i += 2
        else:
            value = "true"
            i += 1
        options[key] = _typed(value)
    return options


def _typed(value: str) -> Any:
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def launch(
    ctx: typer.Context,
    model_name: str = typer.Option(..., "--model-name", "-n", help="Name clients use in the `model` field."),
    model_type: str = typer.Option("LLM", "--model-type", "-t", help="LLM, embedding or rerank."),
    model_engine: Optional[str] = typer.Option(None, "--model-engine", "-en",
                                               help="llama.cpp, transformers, sentence_transformers or vllm "
                                                    "(default: chosen from the files; a .gguf -> llama.cpp)."),
    model_path: Optional[str] = typer.Option(None, "--model-path",
                                             help="A model folder, a .gguf file, or a hub ID (ORG/NAME) to pull."),
    model_uid: Optional[str] = typer.Option(None, "--model-uid", "-u", help="Unique id (default: the name)."),
    model_format: Optional[str] = typer.Option(None, "--model-format", "-f", help="gguf, safetensors or pytorch."),
    quantization: Optional[str] = typer.Option(None, "--quantization", "-q",
                                               help="GGUF quantization to pick in a folder or repo, e.g. Q5_K_M."),
    size_in_billions: Optional[str] = typer.Option(None, "--size-in-billions", "-s",
                                                   help="Model size, used for the memory estimate."),
    n_ctx: Optional[int] = typer.Option(None, "--n-ctx", help="Context length (tokens)."),
    n_parallel: Optional[int] = typer.Option(None, "--n-parallel", help="Parallel sequences (llama.cpp slots)."),
    source: Optional[str] = typer.Option(None, "--source", help="Hub for a hub ID: modelscope or huggingface."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit) to pull."),
    gguf_file: Optional[str] = typer.Option(None, "--file", help="Exact .gguf file to pull from a GGUF repo."),
    force: bool = typer.Option(False, "--force", help="Launch even if the memory estimate says it will not fit."),
    endpoint: Optional[str] = EndpointOption,
    api_key: Optional[str] = ApiKeyOption,
    home_opt: Optional[str] = HomeOption,
) -> None:
    """Launch a model on the running server and wait until it is ready.

    Example (the seed's reranker):
      ragserve launch --model-name qwen3-reranker-4b-local --model-type rerank
        --model-engine llama.cpp --model-path models/Qwen3-Reranker-4B-q4_k_m.gguf
    Extra `--key value` flags are passed to the engine (e.g. --rerank_mode yes_no).
    """
    home = home_from(home_opt)
    options = _parse_extra(list(ctx.args))
    if model_path and not os.path.exists(os.path.expanduser(model_path)):
        from ragserve.hub import HubError, looks_like_hub_id, pull_model

        if looks_like_hub_id(model_path):
            try:
                model_path = str(pull_model(model_path, home, source=source, revision=revision,
                                            quant=quantization, filename=gguf_file))
            except HubError as exc:
                fail(str(exc))
    with client_from(home, endpoint, api_key) as client:
        with console.status(f"launching {model_name} ..."):
            uid = run_or_fail(client.launch, model_uid=model_uid, model_name=model_name, model_type=model_type,
                              model_engine=model_engine, model_path=model_path, model_format=model_format,
                              quantization=quantization, size_in_billions=size_in_billions, n_ctx=n_ctx,
                              n_parallel=n_parallel, force=force or None, options=options or None)
            described = run_or_fail(client.describe_model, uid)
    console.print(f"[green]ready[/] {uid} ({described['model_type']}, engine {described['model_engine']})")
    console.print(f"Model UID: {uid}")


def list_models(endpoint: Optional[str] = EndpointOption, api_key: Optional[str] = ApiKeyOption,
                home_opt: Optional[str] = HomeOption) -> None:
    """List the models on the running server, with their state."""
    home = home_from(home_opt)
    with client_from(home, endpoint, api_key) as client:
        models = run_or_fail(client.list_models)
    if not models:
        console.print("no models are running: launch one with `ragserve launch` or `ragserve up`")
        return
    table = Table("UID", "Type", "Engine", "State", "Threads", "Rule", "Path / error")
    colors = {"ready": "green", "loading": "yellow", "restarting": "yellow", "failed": "red"}
    for model in models:
        state = model["state"]
        detail = model["error"] if state == "failed" else model["model_path"]
        # The model family's rule in force (e.g. Qwen3-Embedding's pooling and query instruction), from the worker.
        rule = (model.get("info") or {}).get("rule") or ""
        threads = (model.get("info") or {}).get("cpu_threads")  # the CPU share planned for its worker
        table.add_row(model["id"], model["model_type"], model["model_engine"],
                      f"[{colors.get(state, 'white')}]{state}[/]", str(threads or ""), rule, detail or "")
    console.print(table)


def terminate(model_uid: str = typer.Argument(..., help="UID of the model to stop."),
              endpoint: Optional[str] = EndpointOption, api_key: Optional[str] = ApiKeyOption,
              home_opt: Optional[str] = HomeOption) -> None:
    """Stop a model and free its memory."""
    home = home_from(home_opt)
    with client_from(home, endpoint, api_key) as client:
        run_or_fail(client.terminate, model_uid)
    console.print(f"terminated {model_uid}")


def register(app: typer.Typer) -> None:
    app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(launch)
    app.command("list")(list_models)
    app.command()(terminate)
