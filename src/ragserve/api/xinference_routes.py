"""What Xinference's own client (`xinference-client`, RESTfulClient) needs beyond the shared routes.

RESTfulClient first asks GET /v1/cluster/auth whether the server wants a key (and sends its api_key only
when the answer is yes), launches with POST /v1/models in Xinference's shape (cluster placement fields
included), reads a model's type and abilities from GET /v1/models/{uid} to choose its handle class, and
may poll launch progress. Chat, embeddings and rerank then go through the OpenAI-style routes.
"""

from __future__ import annotations

from typing import Any, Callable

from fastapi import FastAPI

from ragserve.api.auth import KeyChecker
from ragserve.control.spec import ModelState
from ragserve.control.supervisor import ModelRecord, Supervisor

# Placement and packaging fields of a multi-host Xinference cluster: on one host they have no meaning,
# and must not reach engines as options.
_CLUSTER_FIELDS = frozenset({
    "replica", "n_worker", "n_gpu", "worker_ip", "gpu_idx", "replica_config", "peft_model_config",
    "enable_virtual_env", "virtual_env_packages", "virtual_env_find_links", "envs",
})


def launch_options(options: dict[str, Any], flat_extras: dict[str, Any]) -> dict[str, Any]:
    """Engine options of a launch: `options`, plus the engine kwargs Xinference sends flat at the top level.

    Null fields (RESTfulClient sends every parameter, most as null) and cluster placement fields are
    dropped. `request_limits` is kept: the worker uses it as its queue bound.
    """
    merged = dict(options)
    for key, value in flat_extras.items():
        if value is None or key in _CLUSTER_FIELDS:
            continue
        merged.setdefault(key, value)
    return merged


def install_xinference_routes(app: FastAPI, supervisor: Supervisor, checker: KeyChecker,
                              find_record: Callable[[str], ModelRecord]) -> None:
    @app.get("/v1/cluster/auth", tags=["xinference"])
    async def cluster_auth() -> dict[str, Any]:
        """Whether clients must send an API key. Open, so a client can ask before it has one."""
        return {"auth": checker.enabled}

    @app.get("/v1/models/{model_uid}/progress", tags=["xinference"])
    async def launch_progress(model_uid: str) -> dict[str, Any]:
        record = find_record(model_uid)
        return {"progress": 1.0 if record.state == ModelState.READY else 0.0, "state": record.state.value}
