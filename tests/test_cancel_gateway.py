"""Through the gateway: a client that leaves a rerank frees the model for the next caller.

Needs the gateway to hang up on the worker when its own client leaves a non-streamed request
(api/fast_routes.py); the worker side is tested in test_cancel.py.
"""

from __future__ import annotations

import httpx
import pytest

from conftest import ensure_model, smollm_gguf_path
from test_cancel import MANY_DOCUMENTS, QUERY, fresh_document, timed, within_running_documents


def test_through_the_gateway_an_abandoned_rerank_frees_the_model(server):
    """As RAGFlow meets it: its client gives up on a large rerank; the gateway hangs up on the worker,
    and the next one-document rerank answers in its normal time."""
    uid = ensure_model(server, "t-rerank-yes-no", model_name="t-rerank-yes-no", model_type="rerank",
                       model_engine="llama.cpp", model_path=smollm_gguf_path())
    post = lambda docs, timeout=120: httpx.post(f"{server.url}/v1/rerank", timeout=timeout,  # noqa: E731
                                                json={"model": uid, "query": QUERY, "documents": docs})
    post(fresh_document())  # warm
    baseline, response = timed(lambda: post(fresh_document()))
    assert response.status_code == 200, response.text
    with pytest.raises(httpx.ReadTimeout):
        post(MANY_DOCUMENTS, timeout=1.0)
    elapsed, response = timed(lambda: post(fresh_document()))
    assert response.status_code == 200, response.text
    info = httpx.get(f"{server.url}/v1/models/{uid}").json()["info"]
    assert elapsed < within_running_documents(info, baseline), (elapsed, baseline)
