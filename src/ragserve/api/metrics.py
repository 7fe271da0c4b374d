"""Request accounting: one log line per request, and `/metrics` in Prometheus' text format.

The gateway sees every request, so it counts here: requests by route, model and status; latency
histograms; prompt and completion tokens (read from the `usage` the workers return); requests in flight.
At scrape time it adds what the supervisor knows: each model's state, worker restarts, and the queue depth
each worker reports (requests waiting for an engine slot).

Each app owns its own registry (no process-global metrics), so tests and several apps in one process
never share counters.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

access_log = logging.getLogger("ragserve.access")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Polled by probes and scrapers many times a minute: counted, but not logged at info level.
QUIET_PATHS = frozenset({"/health", "/metrics"})


def usage_from_json(body: bytes) -> Optional[tuple[int, int]]:
    """(prompt_tokens, completion_tokens) from an OpenAI-style body, without parsing the whole of it.

    Embedding responses can be megabytes of floats; `usage` is the last key our workers write, so it is
    found from the end and only that object is decoded.
    """
    at = body.rfind(b'"usage"')
    if at < 0:
        return None
    colon = body.find(b":", at)
    if colon < 0:
        return None
    try:
        usage, _ = json.JSONDecoder().raw_decode(body[colon + 1:].decode("utf-8", "replace").lstrip())
    except ValueError:
        return None
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens") or usage.get("input_tokens") or 0
    completion = usage.get("completion_tokens") or usage.get("output_tokens") or 0
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return prompt, completion


class GatewayMetrics:
    def __init__(self, snapshot: Callable[[], list[dict[str, Any]]]):
        """`snapshot` returns one dict per model: uid, state, restarts, queue_depth (or None)."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("ragserve_requests", "HTTP requests answered, by route, model and status code.",
                                ["route", "model", "status"], registry=self.registry)
        self.latency = Histogram("ragserve_request_duration_seconds",
                                 "Time from request to the last byte of the response (streams included).",
                                 ["route", "model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("ragserve_tokens", "Tokens processed, by model and kind (prompt or completion).",
                              ["model", "kind"], registry=self.registry)
        self.in_flight = Gauge("ragserve_requests_in_flight", "Requests the gateway is answering now.",
                               registry=self.registry)
        self.rejected = Counter("ragserve_requests_rejected",
                                "Requests refused before reaching a model, by reason (auth, too_large, overloaded).",
                                ["reason"], registry=self.registry)
        self.registry.register(_SupervisorCollector(snapshot))

    def observe(self, route: str, model: str, status: int, seconds: float,
                usage: Optional[tuple[int, int]]) -> None:
        self.requests.labels(route, model, str(status)).inc()
        self.latency.labels(route, model).observe(seconds)
        if usage and model:
            prompt, completion = usage
            if prompt:
                self.tokens.labels(model, "prompt").inc(prompt)
            if completion:
                self.tokens.labels(model, "completion").inc(completion)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _SupervisorCollector:
    def __init__(self, snapshot: Callable[[], list[dict[str, Any]]]):
        self.snapshot = snapshot

    def describe(self):
        return []

    def collect(self):
        models = self.snapshot()
        ready = GaugeMetricFamily("ragserve_model_ready", "1 when the model answers requests, else 0.",
                                  labels=["model", "state"])
        restarts = CounterMetricFamily("ragserve_worker_restarts",
                                       "Times the model's worker died and was restarted.", labels=["model"])
        queue = GaugeMetricFamily("ragserve_queue_depth",
                                  "Requests waiting in the model's worker for an engine slot.", labels=["model"])
        for model in models:
            ready.add_metric([model["uid"], model["state"]], 1.0 if model["state"] == "ready" else 0.0)
            restarts.add_metric([model["uid"]], float(model["restarts"]))
            if model.get("queue_depth") is not None:
                queue.add_metric([model["uid"]], float(model["queue_depth"]))
        yield ready
        yield restarts
        yield queue


class ObserveMiddleware:
    """Pure ASGI: times each request to its last byte, then logs one line and records the metrics.

    Route handlers leave `model` and `usage` in the request state; streams fill `usage` as they end,
    which is before this middleware's call returns.
    """

    def __init__(self, app, metrics: GatewayMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        status = 499  # nginx's "client closed request": no response was started

        async def send_observed(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_observed)
        except Exception:
            status = 500
            raise
        finally:
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            route_obj = scope.get("route")
            route = getattr(route_obj, "path", None) or "unmatched"
            model = state.get("model") or ""
            usage = state.get("usage")
            self.metrics.observe(route, model, status, elapsed, usage)
            if state.get("rejected"):
                self.metrics.rejected.labels(state["rejected"]).inc()
            level = logging.DEBUG if scope["path"] in QUIET_PATHS and status < 400 else logging.INFO
            if access_log.isEnabledFor(level):
                prompt, completion = usage if usage else ("-", "-")
                access_log.log(level, "%s %s model=%s status=%d latency_ms=%.1f prompt_tokens=%s "
                                      "completion_tokens=%s%s",
                               scope["method"], scope["path"], model or "-", status, elapsed * 1000, prompt,
                               completion, " stream=true" if state.get("stream") else "")
