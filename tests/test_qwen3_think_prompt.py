"""Reasoning opened by the chat template (Qwen3-*-Thinking-2507, QwQ, R1 distills), through the
server, on every engine that serves chat here: the prompt ends inside `<think>`, so the model's
output starts with reasoning and holds only a bare `</think>`. The reasoning must come back as
`reasoning_content` and the answer as `content`, streamed and not."""

from __future__ import annotations

import httpx
import pytest
from openai import OpenAI

import qwen3_reference as ref
from conftest import ensure_model, smollm_gguf_path
from qwen3_models import ensure_layout_models

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
# SmolLM2's ChatML with the generation prompt of a thinking model.
SMOLLM_THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
# The same prompt written out by hand, to get the model's own continuation through /v1/completions.
SMOLLM_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n<think>\n"


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    return ensure_layout_models(tmp_path_factory.getbasetemp())


def chat(server, uid: str, *, stream: bool, max_tokens: int = 16) -> tuple[str, str, str]:
    """(reasoning_content, content, finish_reason) as an OpenAI client reads them."""
    client = OpenAI(base_url=f"{server.url}/v1", api_key="none")
    if not stream:
        result = client.chat.completions.create(model=uid, messages=FRANCE, temperature=0, max_tokens=max_tokens)
        message = result.choices[0].message
        reasoning = (message.model_extra or {}).get("reasoning_content") or ""
        return reasoning, message.content or "", result.choices[0].finish_reason
    reasoning, content, finish = "", "", None
    for chunk in client.chat.completions.create(model=uid, messages=FRANCE, temperature=0, max_tokens=max_tokens,
                                                stream=True):
        if chunk.choices:
            delta = chunk.choices[0].delta
            reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
            content += delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return reasoning, content, finish


@pytest.mark.parametrize("stream", [False, True])
def test_llama_cpp_thinking_gguf_splits_reasoning(server, models, stream):
    """A GGUF whose own template opens <think>: the model writes "hmm</think>Paris"."""
    expected = ref.greedy_chat(models["thinking"], FRANCE)  # the same weights, run by transformers
    assert expected["prompt"].endswith("<think>\n") and expected["text"] == "hmm</think>Paris"
    uid = ensure_model(server, "think-gguf", model_name="think-gguf", model_type="LLM",
                       model_path=str(models["thinking_gguf"]))
    assert httpx.get(f"{server.url}/v1/models/{uid}", timeout=30).json()["model_engine"] == "llama.cpp"
    assert chat(server, uid, stream=stream) == ("hmm", "Paris", "stop")


@pytest.mark.parametrize("stream", [False, True])
def test_transformers_thinking_folder_splits_reasoning(server, models, stream):
    uid = ensure_model(server, "think-hf", model_name="think-hf", model_type="LLM",
                       model_path=str(models["thinking"]), model_engine="transformers")
    assert chat(server, uid, stream=stream) == ("hmm", "Paris", "stop")


@pytest.mark.parametrize("stream", [False, True])
def test_llama_cpp_chat_template_option_opens_reasoning(server, stream):
    """SmolLM2 with a launch-time chat template that opens <think>: it never closes the block, so its
    whole greedy answer is reasoning (as the model's own continuation of that prompt shows)."""
    uid = ensure_model(server, "smollm-think", model_name="smollm-think", model_type="LLM",
                       model_path=smollm_gguf_path(), options={"chat_template": SMOLLM_THINKING_TEMPLATE})
    plain = httpx.post(f"{server.url}/v1/completions", json={
        "model": uid, "prompt": SMOLLM_PROMPT, "temperature": 0, "max_tokens": 12}, timeout=120).json()
    continuation = plain["choices"][0]["text"]
    assert continuation.strip() and "</think>" not in continuation
    reasoning, content, finish = chat(server, uid, stream=stream, max_tokens=12)
    assert (reasoning, content) == (continuation.strip(), "")
    assert finish == plain["choices"][0]["finish_reason"]


def test_template_without_think_keeps_everything_content(server):
    """The control: SmolLM2's own template does not open <think>, so nothing becomes reasoning."""
    uid = ensure_model(server, "t-chat", model_name="t-chat", model_type="LLM", model_path=smollm_gguf_path())
    reasoning, content, _ = chat(server, uid, stream=False)
    assert reasoning == "" and content



def test_chat_template_option_that_is_not_jinja_fails_the_launch(server):
    response = httpx.post(f"{server.url}/v1/models", json={
        "model_name": "smollm-bad-template", "model_uid": "smollm-bad-template", "model_type": "LLM",
        "model_path": smollm_gguf_path(), "options": {"chat_template": "{% for m in messages %}{{ m.content }}"}},
        timeout=120)
    assert response.status_code >= 400, response.text
    assert "not valid jinja" in response.json()["error"]["message"]


# A template that refuses system messages, as several model templates do with raise_exception.
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("stream", [False, True])
def test_template_that_refuses_the_messages_is_a_400_naming_it(server, stream):
    """The template's own refusal is the request's fault: a 400 before any byte of a stream, not a 500."""
    uid = ensure_model(server, "smol-no-system", model_name="smol-no-system", model_type="LLM",
                       model_path=smollm_gguf_path(), chat_template=NO_SYSTEM_TEMPLATE)
    messages = [{"role": "system", "content": "Be brief."}, *FRANCE]
    response = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                          json={"model": uid, "messages": messages, "max_tokens": 4, "stream": stream})
    assert response.status_code == 400, response.text
    assert "System role not supported" in response.json()["error"]["message"]
    ok = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                    json={"model": uid, "messages": FRANCE, "max_tokens": 4})
    assert ok.status_code == 200, ok.text
