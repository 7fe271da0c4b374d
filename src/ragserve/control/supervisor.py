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
from ragserve.control.threads import THREADS_ENV, explicit_threads, plan_threads
from ragserve.settings import Home

log = logging.getLogger("ragserve.supervisor")

LOAD_TIMEOUT_S = float(os.environ.get("RAGSERVE_LOAD_TIMEOUT", "1800"))
# Restarts in a row (each after a doubling wait, 0.5 s up to 30 s) before a model is marked failed.
MAX_RESTARTS = 5
# A worker that served this long before dying starts a fresh streak: a crash a week is not a crash loop.
STABLE_AFTER_S = 60.0
WORKER_TOKEN_ENV = "RAGSERVE_WORKER_TOKEN"
# Secrets of the gateway that no worker needs: API keys, and hub tokens (workers load local files only).
# A worker's environment is readable by its user in /proc, and engines may print theirs in crash reports.
GATEWAY_ONLY_ENV = ("RAGSERVE_API_KEYS", "RAGSERVE_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                    "MODELSCOPE_API_TOKEN")


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{name}={raw!r} must be a number of seconds above 0 (default {default:g})")
    return value


@dataclass(frozen=True)
class WorkerTimeouts:
    """Bounds on the gateway-to-worker hop, so that a frozen worker (stopped, deadlocked, swapping) cannot
    hold requests forever, plus the liveness probe that finds such a worker and restarts it.

    The first byte of a non-streamed answer comes only when it is complete: a long chat on a CPU takes
    minutes, hence 300 s. A stream's events are bounded apart from each other, the wait for the first
    token (the whole prompt's processing) included. The probe catches a frozen worker well before either.
    """

    connect: float = 5.0
    first_byte: float = 300.0
    stream_idle: float = 300.0
    probe_interval: float = 5.0
    probe_timeout: float = 10.0
    probe_misses: int = 3

    @classmethod
    def from_env(cls) -> "WorkerTimeouts":
        """From RAGSERVE_WORKER_* variables; a value that is not a positive number is an error naming it."""
        misses = _seconds("RAGSERVE_WORKER_PROBE_MISSES", cls.probe_misses)
        if misses != int(misses):
            raise ValueError(f"RAGSERVE_WORKER_PROBE_MISSES={os.environ['RAGSERVE_WORKER_PROBE_MISSES']!r} must be a "
                             f"whole number, 1 or more")
        return cls(connect=_seconds("RAGSERVE_WORKER_CONNECT_TIMEOUT", cls.connect),
                   first_byte=_seconds("RAGSERVE_WORKER_FIRST_BYTE_TIMEOUT", cls.first_byte),
                   stream_idle=_seconds("RAGSERVE_WORKER_STREAM_IDLE_TIMEOUT", cls.stream_idle),
                   probe_interval=_seconds("RAGSERVE_WORKER_PROBE_INTERVAL", cls.probe_interval),
                   probe_timeout=_seconds("RAGSERVE_WORKER_PROBE_TIMEOUT", cls.probe_timeout),
                   probe_misses=int(misses))


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
    threads: Optional[int] = None  # CPU threads the worker was started with (control/threads.py)
    # Liveness probe of a ready worker: misses in a row, when the next probe is due, the probe in flight,
    # and why the supervisor killed the worker (said instead of "killed by SIGKILL").
    probe_misses: int = 0
    next_probe: float = 0.0
    probe_task: Optional[asyncio.Task] = None
    kill_reason: Optional[str] = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process else None


class Supervisor:
    def __init__(self, home: Home, *, persist: bool = True, timeouts: Optional[WorkerTimeouts] = None):
        self.home = home
        self.timeouts = timeouts or WorkerTimeouts.from_env()
        self.persist = persist
        self.records: dict[str, ModelRecord] = {}
        self._http = None  # made on first use: httpx is not imported before the server is ready
        self._watch_task: Optional[asyncio.Task] = None
        self._closing = False
        self.restart_count = 0
        # Models of the last run about to be relaunched: counted in the thread plan from the first relaunch on,
        # so that the order of the relaunches does not decide who gets the cores.
        self._relaunching: dict[str, ModelSpec] = {}
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
        for record in self.records.values():
            if record.probe_task is not None:
                record.probe_task.cancel()
        await asyncio.gather(*(self._stop_process(r) for r in self.records.values()), return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()

    def saved_specs(self) -> list[ModelSpec]:
        try:
            data = json.loads(self.home.models_state_file.read_text())
            specs = [ModelSpec.from_dict(item) for item in data.get("models", [])]
        except (OSError, ValueError, KeyError, TypeError):
            return []
        self._relaunching = {spec.uid: spec for spec in specs}
        return specs

    def _save(self) -> None:
        if not self.persist or self._closing:
            return
        models = [r.spec.to_dict() for r in self.records.values() if r.state != ModelState.FAILED]
        tmp = self.home.models_state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"models": models}, indent=2))
        tmp.replace(self.home.models_state_file)

    # ---- launch / terminate ---------------------------------------------------------------

    async def launch(self, spec: ModelSpec, *, wait_ready: bool = True) -> ModelRecord:
        self._relaunching.pop(spec.uid, None)
        explicit_threads(spec)  # a bad n_threads is refused before any record exists
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
        record.kill_reason = None
        record.probe_misses = 0
        # Shared with the models that run (a failed one holds no cores); see control/threads.py.
        running = [r.spec for r in self.records.values() if r is record or r.state != ModelState.FAILED]
        running += [s for uid, s in self._relaunching.items() if uid not in self.records]
        record.threads = plan_threads(running)[spec.uid]
        log_file = open(self.home.worker_log(spec.uid), "ab")
        record.process = subprocess.Popen(
            [sys.executable, "-m", "ragserve.workers.worker", "--spec-file", str(spec_file), "--port",
             str(record.port)],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self._worker_env(record),
        )
        log_file.close()
        log.info("started worker for %s (pid %s, port %s, engine %s, %s CPU threads)", spec.uid, record.pid,
                 record.port, spec.model_engine, record.threads)

    def _worker_env(self, record: ModelRecord) -> dict[str, str]:
        env = {name: value for name, value in os.environ.items() if name not in GATEWAY_ONLY_ENV}
        # OpenMP's wait policy is left at its default (spin ~3 ms, then sleep): passive waiting cut
        # worker CPU time but cost embedding throughput (batch-32: 0.92x against 0.98x the in-process engine).
        # The engines read THREADS_ENV after their own `n_threads` option.
        return {**env, **self.home.library_env(), "PYTHONUNBUFFERED": "1", WORKER_TOKEN_ENV: self.worker_token,
                THREADS_ENV: str(record.threads)}

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
                    self._schedule_probe(record)
                except Exception:  # never let one model's trouble stop the watcher
                    log.exception("checking %s failed", record.spec.uid)
            await asyncio.sleep(0.2)

    def _schedule_probe(self, record: ModelRecord) -> None:
        """Probe each ready worker's /health every probe_interval, in a task of its own so that a frozen
        worker never delays the watcher."""
        now = time.monotonic()
        if record.state != ModelState.READY or record.probe_task is not None or now < record.next_probe:
            return
        record.next_probe = now + self.timeouts.probe_interval
        record.probe_task = asyncio.create_task(self._probe(record, record.process),
                                                name=f"probe-{record.spec.uid}")

    async def _probe(self, record: ModelRecord, process: Optional[subprocess.Popen]) -> None:
        import httpx

        try:
            try:
                response = await self.http.get(f"{record.base_url}/health", timeout=self.timeouts.probe_timeout)
                answered = response.status_code == 200
            except httpx.HTTPError:
                answered = False
            if record.process is not process or record.state != ModelState.READY or process is None:
                return  # restarted or stopped meanwhile: this answer is about another process
            record.probe_misses = 0 if answered else record.probe_misses + 1
            if record.probe_misses >= self.timeouts.probe_misses and process.poll() is None:
                self._kill_unresponsive(record, process)
        finally:
            record.probe_task = None

    def _kill_unresponsive(self, record: ModelRecord, process: subprocess.Popen) -> None:
        """A worker alive but not answering (SIGSTOP, a deadlock) holds its requests forever: kill it, and
        the watcher restarts it as it does a crashed one."""
        record.kill_reason = (f"did not answer its health check {record.probe_misses} times in a row "
                              f"({self.timeouts.probe_timeout:g} s each, every {self.timeouts.probe_interval:g} s) "
                              f"and was killed")
        record.state = ModelState.RESTARTING
        record.ready.clear()
        record.error = f"the worker {record.kill_reason}; restarting"
        log.warning("worker for %s (pid %s) %s", record.spec.uid, process.pid, record.kill_reason)
        process.kill()

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
                health = (await self.http.get(f"{record.base_url}/health", timeout=2.0)).json()
            except (httpx.HTTPError, ValueError):
                return  # still starting
            if health["state"] == ModelState.READY.value:
                record.state = ModelState.READY
                record.ready_since = time.monotonic()
                record.next_probe = time.monotonic() + self.timeouts.probe_interval
                record.info = {**(health.get("info") or {}), "cpu_threads": record.threads}
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
        how = record.kill_reason or describe_exit(exit_code)
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
            if record.kill_reason:
                return record.kill_reason
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
