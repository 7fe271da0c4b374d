"""Property-based requests from the server's own OpenAPI document: no input, valid or not, may cause a 5xx.

Bounded for CI: 15 examples per operation and mode, no deadline per example. A server of its own,
so generated launches and terminations touch nothing else.
"""

from __future__ import annotations

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from conftest import smollm_gguf_path, start_server, stop_server

EXAMPLES_PER_OPERATION = 15
MODEL = "fuzz-chat"


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("fuzz-home")
    running = start_server(home)
    # Small per-request generation so valid chat requests stay quick.
    running.launch(model_uid=MODEL, model_name=MODEL, model_type="LLM", model_path=smollm_gguf_path(),
                   n_ctx=512)
    yield running
    stop_server(running.process)


def _aim_at_real_model(case, use_real_model: bool) -> None:
    """Half the generated bodies name the running model, so the worker's own validation is fuzzed too;
    generation is capped so a valid request costs milliseconds, not minutes."""
    body = case.body
    if not isinstance(body, dict):
        return
    if use_real_model and "model" in body:
        body["model"] = MODEL
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int) and body[key] > 4:
            body[key] = 4
    if body.get("model") == MODEL and not isinstance(body.get("max_completion_tokens"), int) \
            and not isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = 4  # null or absent would generate up to the context length


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_causes_a_server_error(fuzz_server, mode):
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    failures: list[str] = []
    operations = []
    for result in schema.get_all_operations():
        operation = result.ok()
        # Terminating the fuzz model would only make the rest 404s; launches of generated paths are kept.
        if operation.method.upper() == "DELETE":
            continue
        operations.append(operation)
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/embeddings", "/v1/rerank", "/v1/models"}

    session = requests.Session()
    for operation in operations:
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode), use_real_model=st.booleans())
        def check(case, use_real_model):
            _aim_at_real_model(case, use_real_model)
            response = case.call(base_url=fuzz_server.url, session=session, timeout=120)
            if response.status_code >= 500:
                failures.append(f"{operation.method.upper()} {operation.path} -> {response.status_code}: "
                                f"{response.text[:300]} for {case.body!r:.300}")

        try:
            check()
        except Unsatisfiable:
            # An operation without inputs (GET /health) has no invalid request to make.
            assert mode == GenerationMode.NEGATIVE, f"{operation.method} {operation.path}"
    session.close()
    assert not failures, "\n".join(failures[:10])
    assert httpx.get(f"{fuzz_server.url}/v1/models/{MODEL}").json()["state"] == "ready"
