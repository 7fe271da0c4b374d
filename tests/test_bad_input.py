"""Bad input gets a 4xx OpenAI error that names the cause, never a 5xx, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

from conftest import minilm_path, smollm_gguf_path


def post(server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", timeout=120, **kwargs)


def assert_error(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], (word, error["message"])
    return error


def test_malformed_json(server, chat_uid):
    r = post(server, "/v1/chat/completions", content=b'{"model": "t-chat", "messages": [',
             headers={"content-type": "application/json"})
    assert_error(r, 400, "not valid JSON")


@pytest.mark.parametrize("body,param", [
    ({"model": "t-chat", "messages": "hello"}, "messages"),
    ({"model": "t-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, "max_tokens"),
    ({"model": "t-chat", "messages": [{"role": "user", "content": "hi"}], "temperature": 7}, "temperature"),
    ({"model": "t-chat", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"model": 42, "messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": "t-chat", "messages": [{"role": "user", "content": "hi"}], "n": 3}, "n"),
])
def test_wrong_types_name_the_field(server, chat_uid, body, param):
    error = assert_error(post(server, "/v1/chat/completions", json=body), 400, param)
    assert error["param"] == param


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"model": "t-chat", "messages": []}),
    ("/v1/embeddings", {"model": "t-embed", "input": []}),
    ("/v1/embeddings", {"model": "t-embed", "input": ["fine", "   "]}),
    ("/v1/embeddings", {"model": "t-embed", "input": [[]]}),
    ("/v1/rerank", {"model": "t-embed", "query": "q", "documents": []}),
    ("/v1/rerank", {"model": "t-embed", "query": "", "documents": ["d"]}),
])
def test_empty_inputs(server, path, body):
    assert_error(post(server, path, json=body), 400)


def test_rerank_options_we_cannot_honour_are_refused(server):
    """Cohere's max_chunks_per_doc would change scores; a 400 naming it, never a 200 that ignores it."""
    body = {"model": "t-embed", "query": "q", "documents": ["d"], "max_chunks_per_doc": 4}
    error = assert_error(post(server, "/v1/rerank", json=body), 400, "max_chunks_per_doc")
    assert error["param"] == "max_chunks_per_doc"


def test_huge_inputs_are_refused_before_any_model_work(server, embed_uid):
    too_many = {"model": embed_uid, "input": ["x"] * 2049}
    assert_error(post(server, "/v1/embeddings", json=too_many), 400, "2048")
    too_long = {"model": embed_uid, "input": "word " * 50_000}
    assert_error(post(server, "/v1/embeddings", json=too_long), 400, "characters")
    too_many_tokens = {"model": "t-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}
    assert_error(post(server, "/v1/chat/completions", json=too_many_tokens), 400, "max_tokens")
    # A body over the size limit is refused from its Content-Length, before it is read...
    oversized = b'{"model": "t-embed", "input": "' + b"a" * (33 * 1024 * 1024) + b'"}'
    error = assert_error(post(server, "/v1/embeddings", content=oversized,
                              headers={"content-type": "application/json"}), 413, "RAGSERVE_MAX_BODY_MB")
    assert error["code"] == "request_too_large"

    # ...and a chunked body with no declared size is cut off at the limit.
    def chunks():
        yield b'{"model": "t-embed", "input": "'
        for _ in range(40):
            yield b"a" * (1024 * 1024)
        yield b'"}'

    assert_error(post(server, "/v1/embeddings", content=chunks(), headers={"content-type": "application/json"}),
                 413)


def test_token_ids_outside_the_vocabulary(server, embed_uid):
    assert_error(post(server, "/v1/embeddings", json={"model": embed_uid, "input": [5, 10**7]}), 400, "cl100k_base")
    assert_error(post(server, "/v1/embeddings", json={"model": embed_uid, "input": [[1, -3]]}), 400, "cl100k_base")


def test_unknown_model_lists_the_running_ones(server, chat_uid):
    error = assert_error(post(server, "/v1/chat/completions",
                              json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}),
                         404, "no-such-model", chat_uid, "ragserve launch")
    assert error["code"] == "model_not_found"
    assert_error(httpx.get(f"{server.url}/v1/models/no-such-model"), 404)
    assert_error(httpx.delete(f"{server.url}/v1/models/no-such-model"), 404)


def test_wrong_model_type_points_to_the_right_route(server, embed_uid):
    error = assert_error(post(server, "/v1/chat/completions",
                              json={"model": embed_uid, "messages": [{"role": "user", "content": "hi"}]}),
                         400, "/v1/embeddings")
    assert error["code"] == "wrong_model_type"


def test_model_still_loading(server):
    uid = server.launch(model_uid="still-loading", model_name="still-loading", model_type="embedding",
                        model_path=minilm_path(), wait_ready=False)
    try:
        r = post(server, "/v1/embeddings", json={"model": uid, "input": "hello"})
        error = assert_error(r, 503, "loading", "retry")
        assert error["code"] == "model_not_ready" and r.headers["retry-after"]
    finally:
        httpx.delete(f"{server.url}/v1/models/{uid}")


def test_bad_launches(server):
    assert_error(post(server, "/v1/models", json={"model_name": "x", "model_type": "LLM",
                                                  "model_path": "/no/such/model.gguf"}), 400, "/no/such/model.gguf")
    assert_error(post(server, "/v1/models", json={"model_name": "x", "model_type": "painting",
                                                  "model_path": smollm_gguf_path()}), 400, "painting")
    assert_error(post(server, "/v1/models", json={"model_type": "LLM"}), 400, "model_name")
    for options, words in (({"batch_wait_ms": "abc"}, ("batch_wait_ms", "from 0 to 1000")),
                           ({"batch_wait_ms": -5}, ("batch_wait_ms",)),
                           ({"batch_max_size": 0}, ("batch_max_size", "1 or more"))):
        assert_error(post(server, "/v1/models", json={"model_name": "x", "model_type": "embedding",
                                                      "model_path": minilm_path(), "options": options}), 400, *words)


def test_wrong_method_route_and_content_type(server):
    assert_error(httpx.get(f"{server.url}/v1/chat/completions"), 405)
    assert_error(httpx.get(f"{server.url}/v1/no-such-route"), 404, "/docs")
    r = post(server, "/v1/embeddings", content=b"input=hello", headers={"content-type": "text/plain"})
    assert 400 <= r.status_code < 500 and "error" in r.json()


def test_prompt_longer_than_the_context(server, chat_uid):
    long_prompt = "hello " * 6000  # about 6000 tokens; the model's context is 4096
    r = post(server, "/v1/chat/completions", json={"model": chat_uid, "max_tokens": 4,
                                                   "messages": [{"role": "user", "content": long_prompt}]})
    assert_error(r, 400, "context")


def test_server_still_serves_after_all_that(server, chat_uid):
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    r = post(server, "/v1/chat/completions", json={"model": chat_uid, "max_tokens": 2,
                                                   "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200


HI = [{"role": "user", "content": "Say hi."}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("field,value", [
    ("tools", [TOOL]),
    ("tool_choice", "required"),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}),
    ("response_format", {"type": "json_object"}),
    ("logprobs", True),
    ("top_logprobs", 3),
    ("logit_bias", {"42": 5}),
    ("reasoning_effort", "low"),
])
def test_chat_fields_that_would_change_the_answer_are_refused_not_ignored(server, chat_uid, field, value, stream):
    """An agent that sends tools or a JSON schema must not get a 200 with prose: a 400 naming the field,
    before the first byte of a stream."""
    body = {"model": chat_uid, "messages": HI, "max_tokens": 4, "stream": stream, field: value}
    error = assert_error(post(server, "/v1/chat/completions", json=body), 400, "not supported")
    assert error["param"] == field


def test_fields_that_ask_for_nothing_and_unknown_extras_are_accepted_and_logged_once(server, chat_uid):
    body = {"model": chat_uid, "messages": HI, "max_tokens": 2, "tools": [], "tool_choice": "none",
            "response_format": {"type": "text"}, "logprobs": False, "vendor_extra_x": 1}
    for _ in range(2):
        assert post(server, "/v1/chat/completions", json=body).status_code == 200
    completion = {"model": chat_uid, "prompt": "1, 2,", "max_tokens": 2, "echo": False, "logprobs": None}
    assert post(server, "/v1/completions", json=completion).status_code == 200
    assert_error(post(server, "/v1/completions", json={**completion, "logprobs": 2}), 400, "logprobs")
    log = (server.home / "logs" / "server.log").read_text()
    lines = [line for line in log.splitlines() if "vendor_extra_x" in line]
    assert len(lines) == 1 and chat_uid in lines[0], lines
