"""Streams: input errors are plain 400s before the first byte; chunks carry the fields clients read.

Through the real gateway with the real SmolLM2 GGUF, and the clients that read these answers: the
OpenAI SDK, and xinference-client read the way langchain-xinference reads it.
"""

from __future__ import annotations

import httpx
import pytest

from conftest import ensure_model, smollm_gguf_path

# Far more than 256 tokens (SmolLM2's tokenizer: about one token per word here).
LONG_PROMPT = "Summarise this. " + " ".join(f"word{i}" for i in range(300))


@pytest.fixture(scope="module")
def small_ctx_chat(server) -> str:
    return ensure_model(server, "t-chat-ctx256", model_name="t-chat-ctx256", model_type="LLM",
                        model_path=smollm_gguf_path(), n_ctx=256)


@pytest.mark.parametrize("route,payload", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG_PROMPT}]}),
    ("/v1/completions", {"prompt": LONG_PROMPT}),
])
def test_streamed_prompt_longer_than_the_context_is_a_400(server, small_ctx_chat, route, payload):
    with httpx.stream("POST", f"{server.url}{route}", timeout=120,
                      json={"model": small_ctx_chat, "max_tokens": 8, "stream": True, **payload}) as response:
        response.read()
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "context" in error["message"], error


def test_openai_sdk_stream_raises_bad_request(server, small_ctx_chat):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="EMPTY", max_retries=0, timeout=120)
    with pytest.raises(openai.BadRequestError) as raised:
        stream = client.chat.completions.create(model=small_ctx_chat, max_tokens=8, stream=True,
                                                messages=[{"role": "user", "content": LONG_PROMPT}])
        for _ in stream:
            pass
    assert "context" in str(raised.value)


def test_streamed_prompt_that_fits_still_streams(server, small_ctx_chat):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="EMPTY", max_retries=0, timeout=120)
    chunks = list(client.chat.completions.create(model=small_ctx_chat, max_tokens=8, stream=True, temperature=0,
                                                 messages=[{"role": "user", "content": "Say hello."}]))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
