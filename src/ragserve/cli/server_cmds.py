"""`ragserve serve` and `ragserve stop`: run the gateway in the foreground or detached."""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from ragserve.cli.common import HomeOption, console, fail, home_from
from ragserve.settings import DEFAULT_HOST, DEFAULT_PORT, Home

ALLOWED_HOSTS_ENV = "RAGSERVE_ALLOWED_HOSTS"  # read by the gateway app (api/), comma-separated
_KEY_FLAG_WARNING = ("--api-key puts the key in the process arguments, which every local user can read (`ps`); "
                     "pass it in RAGSERVE_API_KEYS or a file (--api-key-file PATH, mode 600) instead")


def _port_problem(host: str, port: int) -> Optional[str]:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        # As uvicorn binds: a connection of the last server still in TIME_WAIT must not block a restart;
        # a program listening on the port still does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return str(exc.strerror or exc)
    return None


def _read_key_file(path: Path) -> list[str]:
    """Keys, one per line (blank lines and # comments skipped), from a file only its owner can read."""
    try:
        mode = path.stat().st_mode
        lines = path.read_text().splitlines()
    except OSError as exc:
        fail(f"cannot read the API key file {path}: {exc.strerror or exc}")
        return []
    if mode & 0o077:
        fail(f"the API key file {path} can be read or changed by other users (mode {mode & 0o777:o}): make it "
             f"yours alone with `chmod 600 {path}`, then start again")
    keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if any("," in key for key in keys):
        fail(f"a key in {path} contains a comma, which separates keys in RAGSERVE_API_KEYS: use keys without commas "
             f"(e.g. from `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    if not keys:
        fail(f"the API key file {path} holds no key: write one key per line")
    return keys


def _collect_keys(flag_keys: Optional[list[str]], key_file: Optional[Path]) -> tuple[list[str], list[str]]:
    """The server's keys from RAGSERVE_API_KEYS, --api-key-file and --api-key; and warnings to show."""
    from ragserve.api.auth import keys_from_env, parse_keys

    keys = keys_from_env()
    warnings = []
    if key_file is not None:
        keys += _read_key_file(key_file)
    if flag_keys:
        warnings.append(_KEY_FLAG_WARNING)
        keys += parse_keys(",".join(flag_keys))
    return list(dict.fromkeys(keys)), warnings


def _lock_holder(home: Home) -> str:
    try:
        info = json.loads(home.lock_file.read_text())
        return f"pid {info['pid']}, http://{info['client_host']}:{info['port']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its pid and address are not recorded yet"


def _lock_home(home: Home, host: Optional[str] = None, port: Optional[int] = None) -> int:
    """Lock the home for this process's life, or exit naming the server that holds it. Without an address,
    only check: the lock is released at once (the detached server takes it for itself)."""
    fd = os.open(home.lock_file, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited by workers (O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        fail(f"another ragserve server already runs from the home {home.root} ({_lock_holder(home)}): one server "
             f"per home, since both would start the same models and share run/. Use that server, stop it first "
             f"(`ragserve stop --home {home.root}`), or give this one a home of its own (--home or RAGSERVE_HOME)")
    if host is None:
        os.close(fd)
        return -1
    record = json.dumps({"pid": os.getpid(), "host": host, "port": port, "client_host": _client_host(host)})
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode(), 0)
    return fd


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
    return (f"ragserve listens on {host}, reachable from other machines, and has no API key (--allow-no-key): "
            f"anyone who can reach this port can run and launch models. Close it with a key: --api-key-file PATH "
            f"or RAGSERVE_API_KEYS=k1,k2.")


def _refuse_open_without_key(host: str, keys: list[str], allow_no_key: bool) -> None:
    if keys or allow_no_key or _is_loopback(host):
        return
    fail(f"ragserve would listen on {host}, reachable from other machines, with no API key: anyone who can reach "
         f"the port could run, launch and terminate models. Give it a key (--api-key-file PATH with one key per "
         f"line, or RAGSERVE_API_KEYS=k1,k2) and give clients the key; or pass --allow-no-key if every machine "
         f"that can reach this port is trusted; or bind --host 127.0.0.1.")


def _check_limits() -> None:
    """Bounds set in the environment are read before anything starts, so a typo is an error, not a default."""
    from ragserve.api.http_limits import HeaderLimits
    from ragserve.control.supervisor import WorkerTimeouts
    from ragserve.control.threads import env_threads

    try:
        WorkerTimeouts.from_env()
        HeaderLimits.from_env()
        env_threads()
        drain_seconds()
    except ValueError as exc:
        fail(str(exc))


def _lock_down(home: Home) -> None:
    """Files made from here on are the user's alone (logs, run/ state, worker logs, pulled files); an
    older home is brought to the same modes."""
    os.umask(0o077)
    stuck = home.lock_down()
    if stuck:
        console.print(f"[yellow]warning:[/] could not make these private (owned by another user?): "
                      f"{', '.join(stuck)}")


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
                                  "containers (RAGFlow, Dify) reach it, and then needs a key (or --allow-no-key)."),
    port: int = typer.Option(DEFAULT_PORT, "--port", "-p", help="Port (Xinference's default is 9997)."),
    detach: bool = typer.Option(False, "--detach", "-d",
                                help="Run in the background; log to HOME/logs/server.log, pid in HOME/run."),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file",
                                                help="Require one of the keys in this file (one per line; the file "
                                                     "must be readable by you alone: chmod 600). Or set "
                                                     "RAGSERVE_API_KEYS=k1,k2."),
    api_key: Optional[list[str]] = typer.Option(None, "--api-key",
                                                help="Require this Bearer key (repeatable). Visible to every local "
                                                     "user in `ps`: prefer --api-key-file or RAGSERVE_API_KEYS."),
    allow_no_key: bool = typer.Option(False, "--allow-no-key",
                                      help="Serve a non-loopback --host without any key (a trusted network only)."),
    allowed_host: Optional[list[str]] = typer.Option(None, "--allowed-host",
                                                     help="Also accept requests whose Host header names this host "
                                                          "(repeatable), e.g. a DNS name of this machine; loopback "
                                                          "names always are. Or RAGSERVE_ALLOWED_HOSTS=h1,h2."),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
    no_relaunch: bool = typer.Option(False, "--no-relaunch",
                                     help="Do not relaunch the models that were running when the server last stopped."),
    home_opt: Optional[str] = HomeOption,
) -> None:
    """Start the server. Models are added with `ragserve launch` or `ragserve up`."""
    home = home_from(home_opt)
    keys, warnings = _collect_keys(api_key, api_key_file)
    _refuse_open_without_key(host, keys, allow_no_key)
    _check_limits()
    lock_fd = _lock_home(home, *((None, None) if detach else (host, port)))
    problem = _port_problem(host, port)
    if problem:
        fail(f"cannot bind {host}:{port} ({problem}): another program (or ragserve) uses the port. "
             f"Pick another with --port, or stop the other server (`ragserve stop`).")
    _lock_down(home)
    # The gateway reads its keys and hosts from its environment (a detached server inherits them, never
    # through its arguments); the supervisor keeps the keys out of the workers' environment.
    if keys:
        os.environ["RAGSERVE_API_KEYS"] = ",".join(keys)
    if allowed_host:
        previous = os.environ.get(ALLOWED_HOSTS_ENV)
        os.environ[ALLOWED_HOSTS_ENV] = ",".join(([previous] if previous else []) + allowed_host)
    if detach:
        for warning in warnings + [_open_to_network_warning(host)]:
            if warning:
                console.print(f"[yellow]warning:[/] {warning}")
        _serve_detached(home, host, port, log_level, no_relaunch, allow_no_key)
        return
    _run_foreground(home, host, port, log_level, no_relaunch, warnings, lock_fd)


def _run_foreground(home: Home, host: str, port: int, log_level: str, no_relaunch: bool, warnings: list[str],
                    lock_fd: int) -> None:
    _setup_logging(home, log_level)
    import uvicorn

    from ragserve.api.app import create_app
    from ragserve.api.http_limits import uvicorn_options

    app = create_app(home, relaunch_saved=not no_relaunch, bind_host=host)
    _write_server_info(home, host, port)
    log = logging.getLogger("ragserve")
    log.info("ragserve on http://%s:%s (home %s); OpenAI base URL http://%s:%s/v1", host, port, home.root,
             _client_host(host), port)
    for warning in warnings + [_open_to_network_warning(host)]:
        if warning:
            log.warning(warning)
    # uvicorn drains in-flight requests on SIGTERM/SIGINT, then re-raises the signal once it has stopped;
    # these handlers take that re-raised signal, so the process exits normally and cleans up its files.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        # log_config=None: keep the logging set up above (uvicorn's own dictConfig would add its handlers).
        # uvicorn_options: the HTTP parser refuses a request head over RAGSERVE_MAX_HEADER_KB with 431 as it reads.
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=drain_seconds(), log_config=None, **uvicorn_options())
        _draining_server_class()(config, cut_streams=app.state.cut_streams).run()
    finally:
        _clear_server_info(home)
        os.close(lock_fd)  # the home is free for the next server only once this one's files are cleared


def drain_seconds() -> float:
    """How long SIGTERM lets requests in flight finish (RAGSERVE_DRAIN_TIMEOUT, default 30 s)."""
    from ragserve.control.supervisor import _seconds

    return _seconds("RAGSERVE_DRAIN_TIMEOUT", 30.0)


def _draining_server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, plus: a second before the drain deadline, streams still running are ended with an
        error event and [DONE] (api/app.py cut_streams) instead of being dropped when uvicorn cancels them."""

        def __init__(self, config, *, cut_streams):
            super().__init__(config)
            self.cut_streams = cut_streams
            self.loop = None

        async def serve(self, sockets=None):
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig, frame) -> None:
            first = not self.should_exit
            super().handle_exit(sig, frame)
            if first and self.loop is not None:
                delay = max(0.0, self.config.timeout_graceful_shutdown - 1.0)
                self.loop.call_soon_threadsafe(self.loop.call_later, delay, self.cut_streams)

    return DrainingServer


def _serve_detached(home: Home, host: str, port: int, log_level: str, no_relaunch: bool,
                    allow_no_key: bool) -> None:
    # Keys travel in the environment (readable by this user only), never in the child's arguments.
    args = [sys.executable, "-m", "ragserve.cli.main", "serve", "--host", host, "--port", str(port),
            "--home", str(home.root), "--log-level", log_level]
    if no_relaunch:
        args.append("--no-relaunch")
    if allow_no_key:
        args.append("--allow-no-key")
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
