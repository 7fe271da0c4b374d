"""`ragserve up -f STACK` and `ragserve down -f STACK`: deploy a whole RAG stack from one file.

`up` pulls what is missing, checks that everything fits in memory, starts the server when none
answers, launches every model, waits until they are ready, and prints what to paste into
RAGFlow or Dify. `down` terminates the stack's models, and stops the server if `up` started it.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.panel import Panel
from rich.table import Table

from ragserve.cli.common import HomeOption, console, err_console, fail, home_from
from ragserve.client import RagserveClient, ServerError
from ragserve.control.spec import ModelSpec, ModelType
from ragserve.settings import Home

if TYPE_CHECKING:  # the stack schema is imported only by the commands that read a stack file
    from ragserve.control.stack import LoadedStack, StackModel

UP_HELP = """Deploy the models of a stack file and print the settings for RAGFlow / Dify.

STACK (-f) is a YAML file, or the name of a shipped stack: `demo` (built-in small models, runs
offline on a CPU) or `qwen3-rag` (the Qwen3 14B chat + 4B embedding + 4B reranker stack).

  server: {host: 127.0.0.1, port: 9997, api_key: null}
  models:
    - {name: my-chat, type: LLM, hub: Qwen/Qwen3-8B, engine: vllm, n_ctx: 8192}
    - {name: my-embed, type: embedding, path: /models/Qwen3-Embedding-4B}
    - {name: my-rerank, type: rerank, hub: dengcao/Qwen3-Reranker-4B-GGUF, quantization: Q4_K_M}

Model keys: name, type, path (folder, .gguf file or builtin:NAME) or hub (ORG/NAME), engine,
quantization, file, source, revision, size_in_billions, n_ctx, n_parallel, uid, options.

Steps: pull missing hub models into the home; estimate each model's memory and refuse (with the
figures and what would fit) unless --force; start `ragserve serve --detach` if no server answers;
launch all; wait until ready. Models already running under the same name are kept.

A server that `up` starts on a non-loopback host gets a key: the stack's server.api_key, --api-key, or
one generated and printed with the settings (--generate-key does the same on loopback; --allow-no-key
serves without any). The cores are shared among the stack's models (CPU threads in the plan) and each
model is launched with its share, unless its options set n_threads.
"""
NO_KEY_TEXT = "any non-empty text, e.g. EMPTY (the server has no key; RAGFlow's form refuses an empty one)"


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _state_file(home: Home, stack_name: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stack_name)
    return home.run / f"stack-{safe}.json"


def _read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _server_pid(home: Home) -> Optional[int]:
    try:
        return int(json.loads(home.server_info_file.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def lan_address() -> Optional[str]:
    """This machine's outward address (no packet is sent: a UDP connect only picks the route)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("10.255.255.255", 1))
            address = sock.getsockname()[0]
        return None if address.startswith("127.") else address
    except OSError:
        return None


def connection_settings(host: str, port: int, api_key: Optional[str]) -> dict[str, Any]:
    """The base URLs and notes RAGFlow / Dify need, for a client on this host and in Docker."""
    local = f"http://{_client_host(host)}:{port}"
    docker = f"http://host.docker.internal:{port}"
    loopback_only = host in ("127.0.0.1", "localhost", "::1")
    lan = lan_address()
    notes = []
    if loopback_only:
        notes.append(f"the server listens on {host} only, so Docker containers cannot reach it: set "
                     f"`server.host: 0.0.0.0` in the stack (or `ragserve serve --host 0.0.0.0`), set an api_key, "
                     f"and restart the server")
    notes.append("on Linux, host.docker.internal needs `extra_hosts: [\"host.docker.internal:host-gateway\"]` in "
                 "the RAGFlow/Dify compose service (Docker Desktop has it built in)"
                 + (f"; or use this machine's address: http://{lan}:{port}/v1" if lan else ""))
    return {
        "host_base_url": f"{local}/v1",
        "docker_base_url": f"{docker}/v1",
        "lan_base_url": f"http://{lan}:{port}/v1" if lan else None,
        "host_server_url": local,
        "docker_server_url": docker,
        "rerank_url_host": f"{local}/v1/rerank",
        "rerank_url_docker": f"{docker}/v1/rerank",
        "api_key": "the server's api_key" if api_key else NO_KEY_TEXT,
        "docker_reachable": not loopback_only,
        "notes": notes,
    }


def print_settings(host: str, port: int, api_key: Optional[str], models: list[tuple[str, str]],
                   generated_key: Optional[str] = None) -> None:
    settings = connection_settings(host, port, api_key)
    if generated_key:
        settings["api_key"] = f"{generated_key}  (generated by `ragserve up`; `ragserve down` reads it from the home)"
    by_type: dict[str, list[str]] = {}
    for name, mtype in models:
        by_type.setdefault(mtype, []).append(name)
    lines = [
        "[bold]RAGFlow[/]: Model providers > [bold]Xinference[/] (or OpenAI-API-Compatible); add each model by name",
        f"  Base URL, RAGFlow on this host:  [cyan]{settings['host_base_url']}[/]",
        f"  Base URL, RAGFlow in Docker:     [cyan]{settings['docker_base_url']}[/]",
        f"  Rerank URL (if asked):           {settings['rerank_url_docker']}  (host: {settings['rerank_url_host']})",
        "[bold]Dify[/]: Xinference provider: Server URL "
        f"[cyan]{settings['docker_server_url']}[/] (host: {settings['host_server_url']}), Model UID = the name; "
        f"or OpenAI-API-compatible: API endpoint URL [cyan]{settings['docker_base_url']}[/]",
        f"  API key: {settings['api_key']}",
    ]
    labels = {ModelType.LLM.value: "Chat model", ModelType.EMBEDDING.value: "Embedding model",
              ModelType.RERANK.value: "Rerank model"}
    for mtype, label in labels.items():
        if by_type.get(mtype):
            lines.append(f"  {label + ':':17}[green]{', '.join(by_type[mtype])}[/]")
    for note in settings["notes"]:
        lines.append(f"[yellow]note:[/] {note}")
    console.print(Panel("\n".join(lines), title="Connect RAGFlow / Dify", expand=False))


def _line_of(loaded: LoadedStack, index: int, key: Optional[str] = None) -> str:
    return f"{loaded.path.name} {loaded.where(index, key)}"


def _resolve_files(loaded: LoadedStack, home: Home, *, pull: bool) -> tuple[list[Optional[str]], list[str]]:
    """Each model's local path (pulling hub models when `pull`), and the problems found."""
    from ragserve.control.stack import StackError
    paths: list[Optional[str]] = []
    problems: list[str] = []
    for index, model in enumerate(loaded.models):
        try:
            local = loaded.local_path(model)
        except StackError as exc:
            problems.append(f"{_line_of(loaded, index)}: {exc}")
            paths.append(None)
            continue
        if local is not None:
            paths.append(str(local))
            continue
        hub_id = loaded.hub_id(model)
        if hub_id is None:
            problems.append(f"{_line_of(loaded, index, 'path')}: {model.path} does not exist (relative paths are read "
                            f"from {loaded.path.parent}); fix the path, or give a hub ID (hub: ORG/NAME) to pull")
            paths.append(None)
            continue
        if not pull:
            paths.append(None)
            continue
        try:
            from ragserve.hub import HubError, pull_model
        except ImportError:
            problems.append(f"{_line_of(loaded, index)}: {hub_id} must be pulled, but this ragserve has no hub "
                            f"support: pip install 'ragserve[hub]'")
            paths.append(None)
            continue
        try:
            pulled = pull_model(hub_id, home, source=model.source, revision=model.revision,
                                quant=model.quantization, filename=model.file, progress=True, log=console.print)
        except HubError as exc:
            problems.append(f"{_line_of(loaded, index)}: pulling {hub_id} failed: {exc}")
            paths.append(None)
            continue
        paths.append(str(pulled))
    return paths, problems


_FLAG_KEYS = {"--model-engine": "engine:", "--model-type": "type:", "--model-path": "path:",
              "--model-format": "format:", "--quantization": "quantization:", "--size-in-billions": "size_in_billions:",
              "--model-uid": "uid:"}


def _as_stack_keys(message: str) -> str:
    """Launch errors name CLI flags; in a stack file the same settings are keys."""
    for flag, key in _FLAG_KEYS.items():
        message = message.replace(flag, key)
    return message


def _plan_spec(model: StackModel, path: Optional[str]) -> tuple[Optional[ModelSpec], Optional[str]]:
    """The spec the server would build (for the memory estimate), or the launch error it would give."""
    from ragserve.control.resolve import LaunchError, build_spec

    if path is not None:
        try:
            return build_spec(uid=model.model_uid, model_name=model.name, model_type=model.type,
                              model_engine=model.engine, model_path=path, model_format=model.format,
                              quantization=model.quantization, size_in_billions=model.size_in_billions,
                              n_ctx=model.n_ctx, n_parallel=model.n_parallel, options=model.options), None
        except LaunchError as exc:
            return None, _as_stack_keys(str(exc))
    # Not pulled yet (--plan): estimate from the stack's own figures.
    engine = model.engine or ("llama.cpp" if (model.quantization or "").upper().startswith(("Q", "IQ"))
                              else "transformers")
    fmt = "gguf" if engine == "llama.cpp" else "safetensors"
    return ModelSpec(uid=model.model_uid, model_name=model.name, model_type=model.model_type, model_engine=engine,
                     model_path=f"/nonexistent/{model.hub or model.path}", model_format=fmt,
                     quantization=model.quantization, size_in_billions=model.size_in_billions, n_ctx=model.n_ctx,
                     n_parallel=model.n_parallel, options=dict(model.options)), None


def _health(client: RagserveClient) -> tuple[bool, Optional[str]]:
    """(a ragserve server answers, the problem when something else or a locked server answers)."""
    try:
        health = client.health()
    except ServerError as exc:
        if exc.status_code is None:
            return False, None
        if exc.status_code in (401, 403):
            return False, (f"a server answers at {client.endpoint} but refused us ({exc}): set the stack's "
                           f"server.api_key or --api-key to its key")
        return False, (f"another program answers at {client.endpoint} ({exc}); it is not a ragserve server: "
                       f"choose another port (server.port in the stack, or --port)")
    if not isinstance(health, dict) or "models" not in health:
        return False, (f"another program answers at {client.endpoint}; it is not a ragserve server: choose another "
                       f"port (server.port in the stack, or --port)")
    return True, None


def _start_server(home: Home, host: str, port: int, api_key: Optional[str], allow_no_key: bool) -> None:
    args = [sys.executable, "-m", "ragserve.cli.main", "serve", "--detach", "--host", host, "--port", str(port),
            "--home", str(home.root)]
    if allow_no_key:
        args.append("--allow-no-key")
    env = os.environ.copy()
    if api_key:  # in the environment, which only this user can read; arguments show in `ps`
        env["RAGSERVE_API_KEYS"] = api_key
    with console.status(f"starting the server on {host}:{port} ..."):
        done = subprocess.run(args, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        detail = (done.stderr.strip() or done.stdout.strip()).removeprefix("error:").strip()
        fail(f"could not start the server: {detail}")
    console.print(done.stdout.strip())


def _wait(client: RagserveClient, uids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    latest: dict[str, dict[str, Any]] = {}
    with console.status("loading models ...") as status:
        while True:
            try:
                latest = {m["id"]: m for m in client.list_models()}
            except ServerError as exc:
                fail(f"the server stopped answering while models loaded: {exc}")
            pending = [uid for uid in uids if latest.get(uid, {}).get("state") in ("loading", "restarting")]
            if not pending or time.monotonic() > deadline:
                return latest
            status.update(f"loading {', '.join(pending)} ...")
            time.sleep(0.5)


def _estimate_text(estimates: dict[str, Any], uid: str) -> str:
    est = estimates.get(uid)
    if est is None:
        return "?"
    from ragserve.control.memory import gib

    return f"{gib(est.total_bytes)} {est.device.upper() if est.device == 'gpu' else 'RAM'}"


def up(
    file: str = typer.Option(..., "--file", "-f", help="Stack YAML file, or a shipped stack name (demo, qwen3-rag)."),
    host: Optional[str] = typer.Option(None, "--host", "-H", help="Override the stack's server host."),
    port: Optional[int] = typer.Option(None, "--port", "-p", help="Override the stack's server port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="RAGSERVE_API_KEY",
                                          help="Override the stack's server api_key."),
    generate_key: bool = typer.Option(False, "--generate-key",
                                      help="Start the server with a new random key and print it with the settings "
                                           "(done anyway for a non-loopback host without a key)."),
    allow_no_key: bool = typer.Option(False, "--allow-no-key",
                                      help="Start a non-loopback server without any key (a trusted network only)."),
    force: bool = typer.Option(False, "--force", help="Launch even where the memory estimate says it will not fit."),
    plan: bool = typer.Option(False, "--plan", help="Only show what would happen: files, memory, CPU threads; "
                                                    "change nothing."),
    timeout: float = typer.Option(1800.0, "--timeout", help="Seconds to wait for all models to be ready."),
    home_opt: Optional[str] = HomeOption,
) -> None:
    from ragserve.control import memory

    home = home_from(home_opt)
    loaded = _load_or_fail(file)
    server = loaded.server
    host = host or server.host
    port = port or server.port
    state_path = _state_file(home, loaded.name)
    state = _read_state(state_path)
    api_key = api_key or server.api_key or state.get("api_key")
    url = f"http://{_client_host(host)}:{port}"
    console.print(f"stack [bold]{loaded.name}[/] from {loaded.path}: {len(loaded.models)} model(s), server {url}")

    paths, problems = _resolve_files(loaded, home, pull=not plan)
    specs: list[Optional[ModelSpec]] = []
    for index, (model, path) in enumerate(zip(loaded.models, paths)):
        if path is None and not plan:
            specs.append(None)
            continue
        spec, error = _plan_spec(model, path)
        if error:
            problems.append(f"{_line_of(loaded, index)}: {error}")
        specs.append(spec)
    if problems:
        fail("the stack cannot be deployed as written:\n  " + "\n  ".join(problems))

    client = RagserveClient(url, api_key=api_key)
    running_ok, problem = _health(client)
    if problem:
        fail(problem)
    running: dict[str, dict[str, Any]] = {}
    if running_ok:
        running = {m["id"]: m for m in client.list_models()}
    generated_key = _key_to_generate(host, url, api_key, running_ok, generate_key, allow_no_key, plan)
    if generated_key:
        api_key = generated_key
        client = RagserveClient(url, api_key=api_key)
    elif state.get("api_key") and api_key == state["api_key"]:
        generated_key = api_key  # made by an earlier `up` of this stack: show it again
    threads = _plan_threads(specs)

    # ---- memory ---------------------------------------------------------------------------------
    try:
        memory.available()  # a broken setting (RAGSERVE_MEMORY_LIMIT_GB) is said once, before any plan
    except memory.EstimateError as exc:
        fail(str(exc))
    to_launch = [(m, s) for m, s in zip(loaded.models, specs)
                 if s is not None and running.get(m.model_uid, {}).get("state") not in ("ready", "loading",
                                                                                         "restarting")]
    estimates: dict[str, Any] = {}
    refusals: list[str] = []
    planned: list[ModelSpec] = []
    server_pid = _server_pid(home) if running_ok else None
    for model, spec in to_launch:
        try:
            estimates[spec.uid] = memory.check_fits(spec, also=planned, server_pid=server_pid)
        except memory.InsufficientMemory as exc:
            estimates[spec.uid] = exc.estimate
            refusals.append(str(exc))
            if force:
                planned.append(spec)
        except memory.EstimateError as exc:  # a file the estimate cannot read: said, never skipped quietly
            estimates[spec.uid] = None
            refusals.append(str(exc))
            if force:
                planned.append(spec)
        else:
            planned.append(spec)  # the models that fit are counted against the ones after them
    if plan:
        _print_plan(loaded, specs, estimates, refusals, running, threads)
        raise typer.Exit(1 if refusals else 0)
    if refusals and not force:
        fail("nothing was launched: the stack does not fit in memory.\n" + "\n".join(f"- {r}" for r in refusals)
             + "\nChange the stack as suggested, or pass --force to launch anyway.")
    for refusal in refusals:
        err_console.print(f"[yellow]warning (--force):[/] {refusal}")

    # ---- server ---------------------------------------------------------------------------------
    if not running_ok:
        _start_server(home, host, port, api_key, allow_no_key)
        state.update({"started_server": True, "server_pid": _server_pid(home)})
    state.update({"stack": loaded.name, "file": str(loaded.path), "endpoint": url,
                  "models": [m.model_uid for m in loaded.models]})
    if generated_key:
        state["api_key"] = generated_key
    state.setdefault("started_server", False)
    state_path.touch(mode=0o600)
    state_path.chmod(0o600)  # it may hold the generated key
    state_path.write_text(json.dumps(state, indent=2))

    # ---- launch ---------------------------------------------------------------------------------
    launch_errors: dict[str, str] = {}
    for model, spec in to_launch:
        try:
            client.launch(model_uid=spec.uid, model_name=model.name, model_type=model.type,
                          model_engine=spec.model_engine, model_path=spec.model_path, model_format=model.format,
                          quantization=model.quantization, size_in_billions=model.size_in_billions,
                          n_ctx=model.n_ctx, n_parallel=model.n_parallel,
                          options={**model.options, "n_threads": threads[spec.uid]}, force=force or None,
                          wait_ready=False)
        except ServerError as exc:
            launch_errors[spec.uid] = str(exc)
    for model in loaded.models:
        if model.model_uid in running and model.model_uid not in [s.uid for _, s in to_launch]:
            console.print(f"{model.model_uid} is already {running[model.model_uid]['state']}; kept as it is")
    final = _wait(client, [m.model_uid for m in loaded.models], timeout)
    client.close()

    # ---- report ---------------------------------------------------------------------------------
    table = Table("Name", "Type", "Engine", "State", "Memory est.", "Details", title=f"stack {loaded.name} on {url}")
    colors = {"ready": "green", "loading": "yellow", "restarting": "yellow", "failed": "red"}
    failed = False
    footnotes: list[str] = []
    for model in loaded.models:
        uid = model.model_uid
        info = final.get(uid)
        if info is None:
            failed = True
            table.add_row(uid, model.type, model.engine or "", "[red]not launched[/]", _estimate_text(estimates, uid),
                          "see below")
            footnotes.append(f"[red]{uid}[/]: {launch_errors.get(uid, 'not on the server')}")
            continue
        state = info["state"]
        failed = failed or state != "ready"
        facts = []
        if info.get("context_length"):
            facts.append(f"ctx {info['context_length']}")
        if info.get("dimensions"):
            facts.append(f"{info['dimensions']} dims")
        if (info.get("info") or {}).get("cpu_threads"):
            facts.append(f"{info['info']['cpu_threads']} CPU threads")
        if state == "failed":
            facts = ["see below"]
            footnotes.append(f"[red]{uid}[/]: {info.get('error')}")
        elif model.note:
            footnotes.append(f"[dim]{uid}: {model.note}[/]")
        table.add_row(uid, info["model_type"], info["model_engine"], f"[{colors.get(state, 'white')}]{state}[/]",
                      _estimate_text(estimates, uid), ", ".join(facts))
    console.print(table)
    for note in footnotes:
        console.print(note)
    print_settings(host, port, api_key, [(m.model_uid, m.type) for m in loaded.models], generated_key)
    if failed:
        fail(f"not every model is ready; see the table (worker logs in {home.logs}). Fix the cause and run "
             f"`ragserve up -f {file}` again: ready models are kept")
    console.print(f"[green]stack {loaded.name} is up[/]; stop it with: ragserve down -f {file}")


def _key_to_generate(host: str, url: str, api_key: Optional[str], running_ok: bool, generate_key: bool,
                     allow_no_key: bool, plan: bool) -> Optional[str]:
    """A new key when asked for, or when `up` would start a non-loopback server without one."""
    from ragserve.cli.server_cmds import _is_loopback

    if generate_key and api_key:
        fail("--generate-key, but the stack's server.api_key (or --api-key) already sets a key: drop one of them")
    if generate_key and running_ok:
        fail(f"--generate-key, but a server already answers at {url}, and its keys are set when it starts: stop it "
             f"(`ragserve stop`) and run `ragserve up` again, or pass its key with --api-key")
    if plan or running_ok or api_key or allow_no_key:
        return None
    if generate_key or not _is_loopback(host):
        return secrets.token_urlsafe(32)
    return None


def _plan_threads(specs: list[Optional[ModelSpec]]) -> dict[str, int]:
    """Each model's CPU threads when the whole stack runs (control/threads.py); a bad n_threads stops `up`."""
    from ragserve.control.threads import plan_threads

    try:
        return plan_threads(s for s in specs if s is not None)
    except ValueError as exc:
        fail(f"the stack cannot be deployed as written: {exc}")
        raise


def _print_plan(loaded: LoadedStack, specs: list[Optional[ModelSpec]], estimates: dict[str, Any],
                refusals: list[str], running: dict[str, dict[str, Any]], threads: dict[str, int]) -> None:
    from ragserve.control import memory
    from ragserve.control.threads import usable_cores

    table = Table("Name", "Type", "Engine", "Files", "Memory (est.)", "CPU threads", "Breakdown",
                  title=f"plan for {loaded.name}")
    for model, spec in zip(loaded.models, specs):
        uid = model.model_uid
        est = estimates.get(uid)
        where = spec.model_path if spec and not spec.model_path.startswith("/nonexistent/") else \
            f"to pull: {loaded.hub_id(model) or model.path}"
        if uid in running:
            where = f"already {running[uid]['state']} on the server"
        table.add_row(uid, model.type, spec.model_engine if spec else (model.engine or ""), where,
                      _estimate_text(estimates, uid), str(threads.get(uid, "")), est.breakdown() if est else "")
    console.print(table)
    figures = memory.available()
    console.print(f"free now: {figures.describe()}; {usable_cores()} CPU cores, shared by weight (chat 2, "
                  f"embedding and rerank 1) unless a model's options set n_threads")
    for refusal in refusals:
        console.print(f"[red]will not fit:[/] {refusal}")
    if not refusals:
        console.print("[green]everything fits[/]; run the same command without --plan to deploy")


def down(
    file: str = typer.Option(..., "--file", "-f", help="The stack file (or shipped stack name) given to `up`."),
    host: Optional[str] = typer.Option(None, "--host", "-H", help="Override the stack's server host."),
    port: Optional[int] = typer.Option(None, "--port", "-p", help="Override the stack's server port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="RAGSERVE_API_KEY",
                                          help="Override the stack's server api_key."),
    keep_server: bool = typer.Option(False, "--keep-server", help="Do not stop the server even if `up` started it."),
    home_opt: Optional[str] = HomeOption,
) -> None:
    """Terminate the stack's models; stop the server too if `ragserve up` started it and nothing else runs."""
    home = home_from(home_opt)
    loaded = _load_or_fail(file)
    state_path = _state_file(home, loaded.name)
    state = _read_state(state_path)
    url = state.get("endpoint") if not (host or port) else None
    url = url or f"http://{_client_host(host or loaded.server.host)}:{port or loaded.server.port}"
    client = RagserveClient(url, api_key=api_key or loaded.server.api_key or state.get("api_key"))
    reachable, problem = _health(client)
    if problem:
        fail(problem)
    if not reachable:
        console.print(f"no server answers at {url}: nothing to stop")
        state_path.unlink(missing_ok=True)
        return
    present = {m["id"] for m in client.list_models()}
    for model in loaded.models:
        uid = model.model_uid
        if uid not in present:
            continue
        try:
            client.terminate(uid)
            console.print(f"terminated {uid}")
        except ServerError as exc:
            err_console.print(f"[yellow]warning:[/] could not terminate {uid}: {exc}")
    remaining = [m["id"] for m in client.list_models()]
    client.close()
    if state.get("started_server") and not keep_server:
        if remaining:
            console.print(f"the server keeps running: other models are on it ({', '.join(remaining)}); "
                          f"stop it with `ragserve stop`")
        elif state.get("server_pid") and state.get("server_pid") != _server_pid(home):
            console.print("the server was restarted since `up` started it; left running (`ragserve stop` stops it)")
        else:
            done = subprocess.run([sys.executable, "-m", "ragserve.cli.main", "stop", "--home", str(home.root)],
                                  capture_output=True, text=True)
            console.print((done.stdout or done.stderr).strip())
    state_path.unlink(missing_ok=True)
    console.print(f"stack {loaded.name} is down")


def _load_or_fail(file: str) -> "LoadedStack":
    """Read and validate the stack file, or exit with its line-and-field error."""
    from ragserve.control.stack import StackError, load_stack

    try:
        return load_stack(file)
    except StackError as exc:
        fail(str(exc))
        raise  # fail() exits; this keeps type checkers honest


def register(app: typer.Typer) -> None:
    # Listed without importing the stack schema, to keep every command's start fast.
    names = ", ".join(sorted(p.stem for p in (Path(__file__).parent.parent / "stacks").glob("*.yaml"))) or "none"
    app.command("up", help=UP_HELP + f"\nShipped stacks: {names}.")(up)
    app.command("down")(down)
