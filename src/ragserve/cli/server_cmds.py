"""`ragserve serve` and `ragserve stop`: run the gateway in the foreground or detached."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

import typer

from ragserve.cli.common import ApiKeyOption, HomeOption, console, fail, home_from
from ragserve.settings import DEFAULT_HOST, DEFAULT_PORT, Home


def _port_problem(host: str, port: int) -> Optional[str]:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            return str(exc.strerror or exc)
    return None


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _open_to_network_warning(host: str) -> Optional[str]:
    """A server reachable from other machines with no key lets anyone use (and launch) models."""
    from ragserve.api.auth import keys_from_env

    if _is_loopback(host) or keys_from_env():
        return None
    return (f"ragserve listens on {host}, reachable from other machines, and has no API key: anyone who can reach "
            f"this port can run and launch models. Start it with --api-key KEY (or RAGSERVE_API_KEYS=k1,k2) and "
            f"give clients the key, or bind --host 127.0.0.1.")


def _write_server_info(home: Home, host: str, port: int) -> None:
    info = {"pid": os.getpid(), "host": host, "port": port, "client_host": _client_host(host),
            "started_at": time.time()}
    home.server_info_file.write_text(json.dumps(info))
    home.pid_file.write_text(str(os.getpid()))


def _clear_server_info(home: Home) -> None:
    for path in (home.server_info_file, home.pid_file):
        try:
            if path.exists() and path.read_text().strip().startswith(("{", str(os.getpid()))):
                info_pid = json.loads(path.read_text())["pid"] if path.suffix == ".json" else int(path.read_text())
                if info_pid == os.getpid():
                    path.unlink()
        except (OSError, ValueError, KeyError):
            pass


def _setup_logging(home: Home, level: str) -> None:
    # Plain lines, as uvicorn and vLLM write them: one format for the terminal, journald and `--detach`
    # logs, and no rich import (or its half millisecond a line) in the server.
    stream_handler = logging.StreamHandler(sys.stderr)
    stream_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S"))
    file_handler = logging.FileHandler(home.server_log)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        handlers=[stream_handler, file_handler], force=True)
    # httpx logs every call it makes; the access log already has one line per request.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def serve(
    host: str = typer.Option(DEFAULT_HOST, "--host", "-H",
                             help="Address to bind. 127.0.0.1 is this machine only; 0.0.0.0 lets Docker "
                                  "containers (RAGFlow, Dify) reach it; then set --api-key."),
    port: int = typer.Option(DEFAULT_PORT, "--port", "-p", help="Port (Xinference's default is 9997)."),
    detach: bool = typer.Option(False, "--detach", "-d",
                                help="Run in the background; log to HOME/logs/server.log, pid in HOME/run."),
    api_key: Optional[list[str]] = typer.Option(None, "--api-key",
                                                help="Require this Bearer key on every route (repeat for several; "
                                                     "or RAGSERVE_API_KEYS=k1,k2)."),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
    no_relaunch: bool = typer.Option(False, "--no-relaunch",
                                     help="Do not relaunch the models that were running when the server last stopped."),
    home_opt: Optional[str] = HomeOption,
) -> None:
    """Start the server. Models are added with `ragserve launch` or `ragserve up`."""
    home = home_from(home_opt)
    problem = _port_problem(host, port)
    if problem:
        fail(f"cannot bind {host}:{port} ({problem}): another program (or ragserve) uses the port. "
             f"Pick another with --port, or stop the other server (`ragserve stop`).")
    if api_key:
        os.environ["RAGSERVE_API_KEYS"] = ",".join(api_key)
    if detach:
        warning = _open_to_network_warning(host)
        if warning:
            console.print(f"[yellow]warning:[/] {warning}")
        _serve_detached(home, host, port, log_level, no_relaunch)
        return
    _setup_logging(home, log_level)
    import uvicorn

    from ragserve.api.app import create_app

    app = create_app(home, relaunch_saved=not no_relaunch)
    _write_server_info(home, host, port)
    log = logging.getLogger("ragserve")
    log.info("ragserve on http://%s:%s (home %s); OpenAI base URL http://%s:%s/v1", host, port, home.root,
             _client_host(host), port)
    warning = _open_to_network_warning(host)
    if warning:
        log.warning(warning)
    # uvicorn drains in-flight requests on SIGTERM/SIGINT, then re-raises the signal once it has stopped;
    # these handlers take that re-raised signal, so the process exits normally and cleans up its files.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        # log_config=None: keep the logging set up above (uvicorn's own dictConfig would add its handlers).
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=30,
                    log_config=None)
    finally:
        _clear_server_info(home)


def _serve_detached(home: Home, host: str, port: int, log_level: str, no_relaunch: bool) -> None:
    args = [sys.executable, "-m", "ragserve.cli.main", "serve", "--host", host, "--port", str(port),
            "--home", str(home.root), "--log-level", log_level]
    if no_relaunch:
        args.append("--no-relaunch")
    with open(home.server_log, "ab") as log_file:
        process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, env=os.environ.copy())
    import httpx

    url = f"http://{_client_host(host)}:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            fail(f"the server exited at start (code {process.returncode}); see {home.server_log}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code in (200, 401):
                console.print(f"[green]ragserve is running[/] at {url} (pid {process.pid})")
                console.print(f"OpenAI base URL: {url}/v1   log: {home.server_log}   stop: ragserve stop")
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    fail(f"the server did not answer within 30 s; see {home.server_log}")


def stop(home_opt: Optional[str] = HomeOption,
         timeout: float = typer.Option(30.0, help="Seconds to wait for a graceful stop before killing.")) -> None:
    """Stop the server started from this home (its models stop with it)."""
    home = home_from(home_opt)
    try:
        pid = int(home.pid_file.read_text().strip())
    except (OSError, ValueError):
        fail(f"no running server recorded in {home.root}: nothing to stop")
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        home.pid_file.unlink(missing_ok=True)
        home.server_info_file.unlink(missing_ok=True)
        console.print(f"the server (pid {pid}) was not running; cleared its pid file")
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            console.print(f"[green]stopped[/] the server (pid {pid})")
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    home.pid_file.unlink(missing_ok=True)
    home.server_info_file.unlink(missing_ok=True)
    console.print(f"the server (pid {pid}) did not stop in {timeout:.0f} s and was killed")


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(stop)
