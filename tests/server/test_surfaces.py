"""Each API family answers errors in its own body, whoever raises them: the handler, the
router (a wrong method) or the guard (a missing key, a body too large). The family comes from
the route table (app.py), not from the URL's look."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import pytest

from lmscli.engine.fake import FakeEngine
from tests.conftest import ThreadServer

KEY = "sk-surfaces"


@pytest.fixture
def keyed(fake_models: Path) -> Iterator[ThreadServer]:
    server = ThreadServer(FakeEngine(), api_key=KEY, max_body_mb=1)
    yield server
    server.stop()


def anthropic_shaped(r: httpx.Response) -> bool:
    body = r.json()
    return body["type"] == "error" and set(body["error"]) == {"type", "message"}


def v1_shaped(r: httpx.Response) -> bool:
    return set(r.json()["error"]) == {"type", "message", "code", "param"} and \
        r.json()["error"]["type"] in ("invalid_request", "model_not_found", "job_not_found",
                                      "not_implemented", "internal_error")


def test_messages_errors_are_anthropics_from_every_layer(keyed: ThreadServer) -> None:
    url = keyed.base_url + "/v1/messages"
    auth = {"x-api-key": KEY}
    refused = httpx.post(url, json={})  # the guard: no key
    assert refused.status_code == 401 and anthropic_shaped(refused)
    assert refused.json()["error"]["type"] == "authentication_error"
    wrong_method = httpx.get(url, headers=auth)  # the router
    assert wrong_method.status_code == 405 and anthropic_shaped(wrong_method)
    too_large = httpx.post(url, headers=auth | {"Content-Type": "application/json"},
                           content=b"x" * (2 << 20))  # the guard, while reading
    assert too_large.status_code == 413 and anthropic_shaped(too_large)
    assert too_large.json()["error"]["type"] == "request_too_large"
    unknown = httpx.get(url + "/batches", headers=auth)  # no route: the family's paths
    assert unknown.status_code == 404 and anthropic_shaped(unknown)
    with pytest.raises(anthropic.NotFoundError):  # the handler, through the official SDK
        anthropic.Anthropic(base_url=keyed.base_url, api_key=KEY, max_retries=0).messages \
            .create(model="no-such-model", max_tokens=5,
                    messages=[{"role": "user", "content": "hi"}])


def test_rest_v1_errors_are_v1s_from_every_layer(keyed: ThreadServer) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    refused = httpx.get(keyed.base_url + "/api/v1/models")
    assert refused.status_code == 401 and v1_shaped(refused)
    wrong_method = httpx.put(keyed.base_url + "/api/v1/models", headers=auth, json={})
    assert wrong_method.status_code == 405 and v1_shaped(wrong_method)
    assert v1_shaped(httpx.get(keyed.base_url + "/api/v1/nothing-here", headers=auth))
    missing = httpx.get(keyed.base_url + "/api/v1/models/download/status/nope", headers=auth)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "job_not_found"
    unknown = httpx.post(keyed.base_url + "/api/v1/chat", headers=auth,
                         json={"model": "no-such-model", "input": "hi"})
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "model_not_found"


def test_openai_shape_elsewhere_and_for_unknown_paths(keyed: ThreadServer) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    for r in (httpx.post(keyed.base_url + "/v1/chat/completions", json={}),
              httpx.get(keyed.base_url + "/v1/messages-not-a-route", headers=auth),
              httpx.get(keyed.base_url + "/v1/chat/completions", headers=auth)):
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
