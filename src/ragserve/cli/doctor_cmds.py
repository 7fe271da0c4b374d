"""`ragserve doctor`: check the server, its port, its models, paths, engines and GPU; name a fix for each.

Covers the seed guide's troubleshooting list: port unreachable, wrong model path, GPU memory too
small, engine/format mismatch (shown as the model's load error), command not found, and the base
URLs RAGFlow needs on the host and from Docker.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import typer

from ragserve import __version__
from ragserve.cli.common import ApiKeyOption, EndpointOption, HomeOption, console, home_from
from ragserve.client import RagserveClient, ServerError, default_endpoint
from ragserve.settings import Home

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass
class Finding:
    check: str
    status: str  # ok / warn / fail
    message: str
    fix: str = ""


def _server_info(home: Home) -> dict[str, Any]:
    try:
        return json.loads(home.server_info_file.read_text())
    except (OSError, ValueError):
        return {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _port_owner(port: int) -> str:
    """'pid 123 (python3)' for the listener of `port`, when this user may see it."""
    try:
        import psutil

        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                try:
                    name = psutil.Process(conn.pid).name()
                except psutil.Error:
                    name = "?"
                return f"pid {conn.pid} ({name})"
    except Exception:
        pass
    return "a process this user cannot see"


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _free_port_near(port: int) -> int:
    for candidate in range(port + 1, port + 50):
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", candidate))
                return candidate
            except OSError:
                continue
    return port + 1


def check_command() -> Finding:
    found = shutil.which("ragserve")
    if found:
        return Finding("command", OK, f"`ragserve` is on PATH ({found})")
    activate = Path(sys.prefix) / "bin" / "activate"
    return Finding("command", WARN, "the `ragserve` command is not on PATH in this shell",
                   f"activate the environment it was installed in: source {activate} (or run "
                   f"{sys.executable} -m ragserve.cli.main)")


def check_home(home: Home) -> Finding:
    if not os.access(home.root, os.W_OK):
        return Finding("home", FAIL, f"home {home.root} is not writable",
                       "pass --home (or RAGSERVE_HOME) pointing at a folder you own on a disk with room for models")
    free = shutil.disk_usage(home.root).free
    message = (f"home {home.root} (models: {home.models}, logs: {home.logs}); {free / 1024 ** 3:.1f} GiB free "
               f"on its disk")
    if free < 20 * 1024 ** 3:
        return Finding("home", WARN, message, "models need room (Qwen3-14B is ~30 GB): free space, or move the home "
                                              "to a bigger disk with --home / RAGSERVE_HOME")
    return Finding("home", OK, message)


def check_server(home: Home, endpoint: str, api_key: Optional[str]) -> tuple[list[Finding], Optional[list[dict]]]:
    """Server reachability and its port; returns the model list when the server answers."""
    findings: list[Finding] = []
    parsed = urlparse(endpoint)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    info = _server_info(home)
    client = RagserveClient(endpoint, api_key=api_key, timeout=5)
    try:
        health = client.health()
    except ServerError as exc:
        health = None
        error = exc
    else:
        error = None
    if isinstance(health, dict) and "models" in health:
        bound = info.get("host") if info.get("port") == port else None
        findings.append(Finding("server", OK, f"ragserve {health.get('version', '')} answers at {endpoint}"
                                              + (f" (pid {info['pid']}, bound to {bound})" if bound else "")))
        findings.append(Finding("port", OK, f"port {port} is served by ragserve"))
        try:
            models = client.list_models()
        except ServerError as exc:
            findings.append(Finding("models", FAIL, f"listing models failed: {exc}", "see the server log: "
                                                                                     f"{home.server_log}"))
            models = None
        client.close()
        return findings, models
    client.close()
    if error is not None and error.status_code in (401, 403):
        findings.append(Finding("server", FAIL, f"a server answers at {endpoint} but requires an API key ({error})",
                                "pass --api-key KEY (or set RAGSERVE_API_KEY) to the key the server was started with"))
        return findings, None
    if error is not None and error.status_code is None:
        message = f"no ragserve server answers at {endpoint}"
        pid = info.get("pid")
        if pid and not _pid_alive(int(pid)):
            message += (f"; {home.server_info_file} records pid {pid}, which is not running (the server died: see "
                        f"{home.server_log})")
        findings.append(Finding("server", FAIL, message,
                                f"start it: `ragserve serve --port {port}` (add --detach to run it in the background, "
                                f"--host 0.0.0.0 for Docker), or deploy a stack with `ragserve up -f demo`"))
        if _listening(host, port):
            owner = _port_owner(port)
            findings.append(Finding("port", FAIL, f"port {port} on {host} is in use by {owner}, which does not answer "
                                                  f"as ragserve",
                                    f"stop that program, or serve on a free port: `ragserve serve --port "
                                    f"{_free_port_near(port)}` and use that port in RAGFlow"))
        else:
            findings.append(Finding("port", OK, f"port {port} is free for `ragserve serve`"))
        return findings, None
    owner = _port_owner(port)
    findings.append(Finding("server", FAIL, f"another program answers at {endpoint} ({error or 'not ragserve'}); it "
                                            f"is not a ragserve server",
                            "point --endpoint at the ragserve server, or start one with `ragserve serve --port N`"))
    findings.append(Finding("port", FAIL, f"port {port} is in use by {owner}, which is not ragserve",
                            f"stop it, or serve ragserve on a free port: `ragserve serve --port {_free_port_near(port)}`"))
    return findings, None


def check_models(home: Home, models: Optional[list[dict]]) -> list[Finding]:
    findings: list[Finding] = []
    if models is None:
        saved = _saved_models(home)
        for spec in saved:
            path = spec.get("model_path") or ""
            if path and not Path(path).exists():
                findings.append(Finding(f"path {spec.get('uid')}", WARN,
                                        f"{spec.get('uid')} was running last time and will be relaunched by `ragserve "
                                        f"serve`, but its path {path} no longer exists",
                                        f"restore the files, or serve with --no-relaunch and launch it again"))
        return findings
    if not models:
        return [Finding("models", WARN, "the server runs no models",
                        "launch one with `ragserve launch ...` or a whole stack with `ragserve up -f STACK`")]
    for model in models:
        uid = model["id"]
        state = model["state"]
        what = f"{uid} ({model['model_type']}, {model['model_engine']}, {model.get('model_path')})"
        log = home.worker_log(uid)
        if state == "ready":
            facts = [f"ctx {model['context_length']}" if model.get("context_length") else "",
                     f"{model['dimensions']} dims" if model.get("dimensions") else ""]
            extra = ", ".join(f for f in facts if f)
            findings.append(Finding(f"model {uid}", OK, f"{what} is ready" + (f" ({extra})" if extra else "")))
        elif state == "failed":
            findings.append(Finding(f"model {uid}", FAIL, f"{what} failed: {model.get('error')}",
                                    f"fix the cause named above (worker log: {log}), then `ragserve terminate {uid}` "
                                    f"and launch it again (or re-run `ragserve up`)"))
        else:
            detail = f": {model['error']}" if model.get("error") else ""
            findings.append(Finding(f"model {uid}", WARN, f"{what} is {state}{detail}",
                                    f"wait and run `ragserve doctor` again; progress in {log}"))
        path = model.get("model_path")
        if path and not Path(path).exists():
            findings.append(Finding(f"path {uid}", FAIL, f"the files of {uid} are gone: {path} does not exist",
                                    f"restore them (`ragserve pull`), or terminate {uid} and launch it from the right "
                                    f"path"))
    return findings


def _saved_models(home: Home) -> list[dict[str, Any]]:
    try:
        return list(json.loads(home.models_state_file.read_text()).get("models", []))
    except (OSError, ValueError, AttributeError):
        return []


def _import_check(packages: tuple[str, ...]) -> tuple[bool, str]:
    code = "; ".join(f"import {p}" for p in packages)
    if "torch" in packages:
        code += "; print('cuda', torch.cuda.is_available())"
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                              env={**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")})
    except subprocess.TimeoutExpired:
        return False, "importing took over 180 s"
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        if done.returncode < 0:
            tail = f"the import crashed (signal {-done.returncode}); {tail}"
        return False, tail
    return True, done.stdout.strip()


def check_engines(models: Optional[list[dict]], import_check: bool, gpu: bool) -> list[Finding]:
    from ragserve.engines import ENGINES

    used = {m.get("model_engine") for m in models or []}
    findings: list[Finding] = []
    present = {name: info for name, info in ENGINES.items() if not info.missing_packages()}
    results: dict[str, tuple[bool, str]] = {}
    if import_check and present:
        # One interpreter imports them all (torch once); only if that fails is each engine tried alone.
        everything = tuple(dict.fromkeys(pkg for info in present.values() for pkg in info.requires))
        all_ok, output = _import_check(everything)
        if all_ok:
            results = {name: (True, output) for name in present}
        else:
            with ThreadPoolExecutor(max_workers=len(present)) as pool:
                futures = {name: pool.submit(_import_check, info.requires) for name, info in present.items()}
                results = {name: future.result() for name, future in futures.items()}
    for name, info in ENGINES.items():
        missing = info.missing_packages()
        if missing:
            needed = name in used
            if name == "vllm" and not gpu and not needed:
                findings.append(Finding(f"engine {name}", OK, f"{name} is not installed (it needs a GPU; none here)"))
                continue
            findings.append(Finding(f"engine {name}", FAIL if needed else WARN,
                                    f"{name} is not installed (missing {', '.join(missing)})"
                                    + ("; a model on the server uses it" if needed else ""),
                                    f"{info.install_hint()} in the server's environment, then restart the server"
                                    if name != "vllm" else "pip install vllm (GPU machines), then restart the server"))
            continue
        if name in results and not results[name][0]:
            findings.append(Finding(f"engine {name}", FAIL, f"{name} is installed but importing it fails: "
                                                            f"{results[name][1]}",
                                    f"reinstall it: pip install --force-reinstall 'ragserve[{info.extra}]'"))
            continue
        extra = ""
        if name in results and "cuda False" in results[name][1] and gpu:
            findings.append(Finding(f"engine {name}", WARN, f"{name} imports, but torch sees no CUDA GPU although "
                                                            f"one is visible: torch is a CPU build",
                                    "install a CUDA build of torch matching the driver (see `nvidia-smi`)"))
            continue
        if name in results:
            extra = " and imports"
        findings.append(Finding(f"engine {name}", OK, f"{name} is installed{extra}"))
    return findings


def check_gpu() -> tuple[Finding, bool]:
    from ragserve.control import memory

    gpus = memory.gpus()
    if gpus:
        listing = "; ".join(f"GPU {g['index']} {g['name']}: {g['free'] / 1024 ** 3:.1f} of "
                            f"{g['total'] / 1024 ** 3:.1f} GiB free" for g in gpus)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return Finding("gpu", OK, listing + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")), True
    if memory.gpu_visible():
        return Finding("gpu", WARN, "an NVIDIA driver is loaded but nvidia-smi is not on PATH",
                       "add the driver's bin folder to PATH so ragserve can read free GPU memory"), True
    return Finding("gpu", WARN, "no GPU is visible: models run on the CPU (fine for small and GGUF models)",
                   "for 14B-class models use a GPU machine, or a Q4_K_M / Q5_K_M GGUF with engine llama.cpp"), False


def check_memory() -> Finding:
    from ragserve.control import memory

    try:
        figures = memory.available()
    except memory.EstimateError as exc:  # e.g. RAGSERVE_MEMORY_LIMIT_GB that is not a number
        return Finding("memory", FAIL, str(exc), "fix the setting named above, then run `ragserve doctor` again")
    return Finding("memory", OK, f"{figures.describe()}; budget for new models {memory.gib(figures.budget_bytes)}")


def check_hub() -> Finding:
    from importlib.util import find_spec

    libs = [name for name, mod in (("modelscope", "modelscope"), ("huggingface", "huggingface_hub"))
            if find_spec(mod) is not None]
    if not libs:
        return Finding("hub", WARN, "no hub library is installed, so `ragserve pull` and hub IDs in stacks cannot "
                                    "download", "pip install 'ragserve[hub]'")
    chosen = os.environ.get("RAGSERVE_HUB")
    return Finding("hub", OK, f"hub libraries: {', '.join(libs)}" + (f"; RAGSERVE_HUB={chosen}" if chosen else ""))


def _wants_key(endpoint: str) -> bool:
    """Whether the server asks for a key, from the open route Xinference's client asks (False if none answers)."""
    import httpx

    try:
        return bool(httpx.get(f"{endpoint.rstrip('/')}/v1/cluster/auth", timeout=5).json().get("auth"))
    except (httpx.HTTPError, ValueError, AttributeError):
        return False


def check_urls(home: Home, endpoint: str, reachable: bool) -> tuple[Finding, dict[str, Any]]:
    from ragserve.cli.stack_cmds import connection_settings

    parsed = urlparse(endpoint)
    info = _server_info(home)
    bound = info.get("host") if reachable and info.get("port") == parsed.port else None
    keyed = _wants_key(endpoint)
    settings = connection_settings(bound or parsed.hostname or "127.0.0.1", parsed.port or 80,
                                   "(set)" if keyed else None)
    settings["host_base_url"] = f"{endpoint.rstrip('/')}/v1"
    message = (f"RAGFlow on this host: {settings['host_base_url']}; RAGFlow in Docker: "
               f"{settings['docker_base_url']}; API key: {settings['api_key']}")
    if bound in ("127.0.0.1", "localhost", "::1"):
        return Finding("urls", WARN, message + f" (but the server is bound to {bound}, so Docker cannot reach it)",
                       f"restart it reachable from containers: `ragserve serve --host 0.0.0.0 --port {parsed.port} "
                       f"--api-key-file KEYFILE` (or server.host: 0.0.0.0 in the stack)"), settings
    return Finding("urls", OK, message + ("; on Linux Docker add host.docker.internal:host-gateway to extra_hosts"
                                          if bound else "")), settings


def run_checks(home: Home, endpoint: str, api_key: Optional[str], import_check: bool = True
               ) -> tuple[list[Finding], dict[str, Any]]:
    findings = [check_command(), check_home(home)]
    server_findings, models = check_server(home, endpoint, api_key)
    findings += server_findings
    findings += check_models(home, models)
    gpu_finding, gpu = check_gpu()
    findings += check_engines(models, import_check, gpu)
    findings.append(gpu_finding)
    findings.append(check_memory())
    findings.append(check_hub())
    url_finding, settings = check_urls(home, endpoint, models is not None)
    findings.append(url_finding)
    return findings, settings


def doctor(
    as_json: bool = typer.Option(False, "--json", help="Print the findings as JSON (for scripts)."),
    port: Optional[int] = typer.Option(None, "--port", "-p", help="Check this port on 127.0.0.1 instead of the "
                                                                  "recorded server."),
    no_import_check: bool = typer.Option(False, "--no-import-check",
                                         help="Skip importing each engine in a subprocess (faster)."),
    endpoint: Optional[str] = EndpointOption,
    api_key: Optional[str] = ApiKeyOption,
    home_opt: Optional[str] = HomeOption,
) -> None:
    """Check the server, port, models, paths, engines and GPU; each problem comes with a fix.

    Exits with 1 when any check fails.
    """
    home = home_from(home_opt)
    target = endpoint or (f"http://127.0.0.1:{port}" if port else default_endpoint(home))
    findings, settings = run_checks(home, target.rstrip("/"), api_key, import_check=not no_import_check)
    failed = any(f.status == FAIL for f in findings)
    if as_json:
        print(json.dumps({"ok": not failed, "version": __version__, "endpoint": target, "home": str(home.root),
                          "findings": [asdict(f) for f in findings], "base_urls": settings}, indent=2))
    else:
        style = {OK: "[green]ok  [/]", WARN: "[yellow]warn[/]", FAIL: "[bold red]fail[/]"}
        for f in findings:
            console.print(f"{style[f.status]} [bold]{f.check}[/]: {f.message}", highlight=False)
            if f.fix and f.status != OK:
                console.print(f"       fix: {f.fix}", highlight=False)
        counts = {s: sum(1 for f in findings if f.status == s) for s in (OK, WARN, FAIL)}
        console.print(f"\n{counts[OK]} ok, {counts[WARN]} warning(s), {counts[FAIL]} failure(s)")
    if failed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command()(doctor)
