"""Starts, watches and stops model workers: one process per launched model.

The supervisor is the only owner of worker processes. It reports each model's state
(loading / ready / failed with the worker's error), restarts a worker that dies with
backoff, and remembers what runs so a restarted server brings the same models back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from ragserve.control.spec import ModelSpec, ModelState
from ragserve.settings import Home

log = logging.getLogger("ragserve.supervisor")

LOAD_TIMEOUT_S = float(os.environ.get("RAGSERVE_LOAD_TIMEOUT", "1800"))
# Restarts in a row (each after a doubling wait, 0.5 s up to 30 s) before a model is marked failed.
MAX_RESTARTS = 5
# A worker that served this long before dying starts a fresh streak: a crash a week is not a crash loop.
STABLE_AFTER_S = 60.0
WORKER_TOKEN_ENV = "RAGSERVE_WORKER_TOKEN"


def describe_exit(code: int) -> str:
    """A worker's exit status in words, with the usual cause of a SIGKILL."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        text = f"was killed by {name}"
        if -code == signal.SIGKILL:
            text += " (sent by `kill -9` or by the kernel's out-of-memory killer: see `dmesg`)"
        return text
    return f"exited with code {code}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ModelRecord:
    spec: ModelSpec
    state: ModelState = ModelState.LOADING
    error: Optional[str] = None
    port: Optional[int] = None
    process: Optional[subprocess.Popen] = None
    launched_at: float = field(default_factory=time.time)
    restarts: int = 0
    crash_streak: int = 0
    last_exit: Optional[int] = None
    ready_since: Optional[float] = None
    info: dict[str, Any] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process else None


class Supervisor:
    def __init__(self, home: Home, *, persist: bool = True):
        self.home = home
        self.persist = persist
        self.records: dict[str, ModelRecord] = {}
        self._http = None  # made on first use: httpx is not imported before the server is ready
        self._watch_task: Optional[asyncio.Task] = None
        self._closing = False
        self.restart_count = 0
        # Shared with the workers through their environment; the gateway sends it on every forwarded call.
        self.worker_token = secrets.token_urlsafe(32)

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._watch_task = asyncio.create_task(self._watch(), name="supervisor-watch")

    @property
    def http(self):
        if self._http is None:
            import httpx

            self._http = httpx.AsyncClient(timeout=httpx.Timeout(5.0))
        return self._http

    async def shutdown(self) -> None:
        self._closing = True
        if self._watch_task:
            self._watch_task.cancel()
        await asyncio.gather(*(self._stop_process(r) for r in self.records.values()), return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()

    def saved_specs(self) -> list[ModelSpec]:
        try:
            data = json.loads(self.home.models_state_file.read_text())
            return [ModelSpec.from_dict(item) for item in data.get("models", [])]
        except (OSError, ValueError, KeyError, TypeError):
            return []

    def _save(self) -> None:
        if not self.persist or self._closing:
            return
        models = [r.spec.to_dict() for r in self.records.values() if r.state != ModelState.FAILED]
        tmp = self.home.models_state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"models": models}, indent=2))
        tmp.replace(self.home.models_state_file)

    # ---- launch / terminate ---------------------------------------------------------------

    async def launch(self, spec: ModelSpec, *, wait_ready: bool = True) -> ModelRecord:
        existing = self.records.get(spec.uid)
        if existing is not None:
            if existing.state != ModelState.FAILED:
                raise ValueError(f"a model with uid {spec.uid!r} is already {existing.state.value}: terminate it "
                                 f"first (`ragserve terminate {spec.uid}`) or pass another --model-uid")
            await self._stop_process(existing)
        record = ModelRecord(spec=spec)
        self.records[spec.uid] = record
        self._spawn(record)
        self._save()
        if wait_ready:
            await self.wait_ready(record)
        return record

    async def wait_ready(self, record: ModelRecord, timeout: float = LOAD_TIMEOUT_S) -> None:
        try:
            await asyncio.wait_for(record.ready.wait(), timeout)
        except asyncio.TimeoutError:
            record.state = ModelState.FAILED
            record.error = f"model did not load within {timeout:.0f} s; see {self.home.worker_log(record.spec.uid)}"
            await self._stop_process(record)

    async def terminate(self, uid: str) -> None:
        record = self.records.pop(uid)
        await self._stop_process(record)
        self._save()

    def _spawn(self, record: ModelRecord) -> None:
        spec = record.spec
        spec_file = self.home.run / f"worker-{spec.uid}.json"
        spec_file.write_text(json.dumps(spec.to_dict()))
        record.port = free_port()
        record.state = ModelState.LOADING
        record.ready.clear()
        log_file = open(self.home.worker_log(spec.uid), "ab")
        # OpenMP's wait policy is left at its default (spin ~3 ms, then sleep): passive waiting cut
        # worker CPU time but cost embedding throughput (batch-32: 0.92x against 0.98x the in-process engine).
        env = {**os.environ, **self.home.library_env(),
               "PYTHONUNBUFFERED": "1", WORKER_TOKEN_ENV: self.worker_token}
        record.process = subprocess.Popen(
            [sys.executable, "-m", "ragserve.workers.worker", "--spec-file", str(spec_file), "--port",
             str(record.port)],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )
        log_file.close()
        log.info("started worker for %s (pid %s, port %s, engine %s)", spec.uid, record.pid, record.port,
                 spec.model_engine)

    async def _stop_process(self, record: ModelRecord) -> None:
        process = record.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        for _ in range(50):
            if process.poll() is not None:
                return
            await asyncio.sleep(0.1)
        process.kill()
        await asyncio.to_thread(process.wait)

    # ---- watching --------------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            for record in list(self.records.values()):
                try:
                    await self._check(record)
                except Exception:  # never let one model's trouble stop the watcher
                    log.exception("checking %s failed", record.spec.uid)
            await asyncio.sleep(0.2)

    def _log_tail(self, uid: str, lines: int = 8) -> str:
        try:
            text = self.home.worker_log(uid).read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    async def _check(self, record: ModelRecord) -> None:
        process = record.process
        if process is None or record.state == ModelState.FAILED:
            return
        exit_code = process.poll()
        if exit_code is not None:
            await self._on_exit(record, exit_code)
            return
        if record.state in (ModelState.LOADING, ModelState.RESTARTING):
            import httpx

            try:
                health = (await self.http.get(f"{record.base_url}/health")).json()
            except (httpx.HTTPError, ValueError):
                return  # still starting
            if health["state"] == ModelState.READY.value:
                record.state = ModelState.READY
                record.ready_since = time.monotonic()
                record.info = health.get("info") or {}
                record.error = None
                record.ready.set()
            elif health["state"] == ModelState.FAILED.value:
                record.state = ModelState.FAILED
                record.error = health.get("error") or "the worker failed to load the model"
                record.ready.set()
                await self._stop_process(record)
                self._save()

    async def _on_exit(self, record: ModelRecord, exit_code: int) -> None:
        uid = record.spec.uid
        record.last_exit = exit_code
        how = describe_exit(exit_code)
        if record.state == ModelState.LOADING and record.restarts == 0:
            record.state = ModelState.FAILED
            record.error = (f"the worker {how} while loading. Last log lines:\n"
                            f"{self._log_tail(uid)}")
            record.ready.set()
            self._save()
            return
        if record.ready_since is not None and time.monotonic() - record.ready_since >= STABLE_AFTER_S:
            record.crash_streak = 0
        record.ready_since = None
        if record.crash_streak >= MAX_RESTARTS:
            record.state = ModelState.FAILED
            record.error = (f"the worker died {record.crash_streak + 1} times in a row (last: it {how}); gave up. "
                            f"See {self.home.worker_log(uid)}, then terminate and launch the model again")
            record.ready.set()
            self._save()
            return
        backoff = min(30.0, 0.5 * 2 ** record.crash_streak)
        record.crash_streak += 1
        record.restarts += 1
        self.restart_count += 1
        record.state = ModelState.RESTARTING
        record.ready.clear()
        record.error = f"the worker {how}; restarting in {backoff:.1f} s"
        log.warning("worker for %s %s; restart %d in %.1f s", uid, how, record.restarts, backoff)
        record.process = None
        asyncio.create_task(self._respawn_later(record, backoff), name=f"respawn-{uid}")

    async def exit_cause(self, record: ModelRecord, wait_s: float = 0.5) -> Optional[str]:
        """Why a worker stopped answering, if it died: a dropped connection is seen a moment before the
        process is reaped, so wait briefly for its exit status."""
        deadline = time.monotonic() + wait_s
        while True:
            process = record.process
            if process is None:  # the watcher already saw the exit and schedules a restart
                return describe_exit(record.last_exit) if record.last_exit is not None else None
            code = process.poll()
            if code is not None:
                return describe_exit(code)
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.05)

    async def queue_depths(self) -> dict[str, Optional[int]]:
        """Requests waiting in each ready worker, from its /health; None where a worker does not answer."""
        import httpx

        async def depth(record: ModelRecord) -> Optional[int]:
            if record.state != ModelState.READY or not record.port:
                return None
            try:
                response = await self.http.get(f"{record.base_url}/health", timeout=1.0)
                return int(response.json().get("waiting", 0))
            except (httpx.HTTPError, ValueError, TypeError, AttributeError):
                return None

        records = list(self.records.values())
        depths = await asyncio.gather(*(depth(r) for r in records))
        return {r.spec.uid: d for r, d in zip(records, depths)}

    async def _respawn_later(self, record: ModelRecord, delay: float) -> None:
        await asyncio.sleep(delay)
        if self.records.get(record.spec.uid) is record and not self._closing:
            self._spawn(record)
            record.state = ModelState.RESTARTING
