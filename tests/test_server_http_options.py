"""vLLM's frontend flags on a real server: CORS (`--allowed-origins`, ...), X-Request-Id
(`--enable-request-id-headers`), `--root-path`, `--response-role`,
`--disable-fastapi-docs`, TLS (`--ssl-*`, with a certificate from a trustme CA),
SageMaker's /ping and /invocations, and the dev-mode /reset_prefix_cache."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
import trustme

from tests.server_utils import RemoteServer

KEY = "secret-key"
APP = "https://app.example"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "The quick brown fox jumps over the lazy dog near the riverbank. " * 3


@pytest.fixture(scope="module")
def server(tiny_models):
    args = ["--served-model-name", "tiny", "--dtype", "float32", "--max-model-len", "512",
            "--api-key", KEY, "--enable-request-id-headers", "--root-path", "/api",
            "--allowed-origins", json.dumps([APP]), "--response-role", "bot",
            "--disable-fastapi-docs", "--enable-prompt-tokens-details"]
    with RemoteServer(tiny_models["llama"], args, env={"LORAPLEX_SERVER_DEV_MODE": "1"},
                      api_key=KEY) as srv:
        yield srv


def test_cors_answers_preflights_for_allowed_origins_only(server):
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    ok = httpx.options(server.url_for("v1/chat/completions"),
                       headers={"Origin": APP, **preflight})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == APP
    assert "POST" in ok.headers["access-control-allow-methods"]
    other = httpx.options(server.url_for("v1/chat/completions"),
                          headers={"Origin": "https://elsewhere.example", **preflight})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    # a refused key is labelled too, so the browser lets the page read the 401
    denied = httpx.get(server.url_for("v1/models"), headers={"Origin": APP})
    assert denied.status_code == 401
    assert denied.headers["access-control-allow-origin"] == APP
    assert denied.json()["error"]["type"] == "AuthenticationError"


def test_request_id_header_is_echoed_or_made(server):
    given = server.get("v1/models", headers={"X-Request-Id": "req-42"})
    assert given.status_code == 200 and given.headers["x-request-id"] == "req-42"
    made = server.get("v1/models")
    assert len(made.headers["x-request-id"]) == 32
    assert made.headers["x-request-id"] != server.get("v1/models").headers["x-request-id"]
    failed = server.post("v1/completions", json={"model": "tiny", "prompt": "a",
                                                 "max_tokens": -1},
                         headers={"X-Request-Id": "bad-1"})
    assert failed.status_code == 400 and failed.headers["x-request-id"] == "bad-1"


def test_routes_answer_with_and_without_the_root_path(server):
    for path in ("v1/models", "api/v1/models"):
        r = httpx.get(server.url_for(path), headers=AUTH)
        assert r.status_code == 200, path
        assert r.json()["data"][0]["id"] == "tiny"
        assert httpx.get(server.url_for(path)).status_code == 401, path  # the key too
    client = openai.OpenAI(base_url=server.url_for("api/v1"), api_key=KEY, max_retries=0)
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=2)
    assert r.usage.completion_tokens == 2


def test_response_role(server):
    """--response-role names a new reply's role; a continued message keeps its own."""
    client = server.get_client()
    messages = [{"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    assert r.choices[0].message.role == "bot"
    first = next(iter(client.chat.completions.create(model="tiny", messages=messages,
                                                     max_tokens=2, stream=True)))
    assert first.choices[0].delta.role == "bot"
    continued = client.chat.completions.create(
        model="tiny", messages=[*messages, {"role": "assistant", "content": "Hello"}],
        max_tokens=2, extra_body={"add_generation_prompt": False,
                                  "continue_final_message": True})
    assert continued.choices[0].message.role == "assistant"


def test_no_docs(server):
    for path in ("docs", "redoc", "openapi.json"):
        assert httpx.get(server.url_for(path)).status_code == 404, path


def test_sagemaker_ping_and_invocations(server):
    for method in ("GET", "POST"):
        assert httpx.request(method, server.url_for("ping")).status_code == 200
    chat = server.post("invocations", json={"model": "tiny", "max_tokens": 2,
                                            "messages": [{"role": "user", "content": "Hi"}]})
    assert chat.status_code == 200 and chat.json()["object"] == "chat.completion"
    assert chat.json()["choices"][0]["message"]["role"] == "bot"
    text = server.post("invocations", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
    assert text.status_code == 200 and text.json()["object"] == "text_completion"
    assert text.json()["usage"]["completion_tokens"] == 2
    for body, needle in ((b"{not json", "not valid JSON"), ({"input": "Hi"}, "'messages'"),
                         ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
                         ({"prompt": "Hi", "model": "ghost"}, "ghost")):
        bad = server.post("invocations", json=body)
        assert bad.status_code in (400, 404), (body, bad.text)
        assert needle in bad.json()["error"]["message"], (body, bad.text)
    assert server.post("invocations", json={"prompt": "Hi", "max_tokens": 1}).status_code == 200


def _cached(server) -> int:
    r = server.post("v1/completions", json={"model": "tiny", "prompt": PROMPT,
                                            "max_tokens": 1})
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_reset_prefix_cache(server):
    """Dev mode's /reset_prefix_cache: the next request computes its prompt in full; while
    a request holds KV blocks the cache stays and the answer is a 409."""
    _cached(server)
    assert _cached(server) > 0
    assert server.post("reset_prefix_cache").status_code == 200
    assert _cached(server) == 0
    streaming, started = {}, threading.Event()

    def long_request() -> None:
        with httpx.stream("POST", server.url_for("v1/completions"), headers=AUTH, timeout=120,
                          json={"model": "tiny", "prompt": PROMPT, "max_tokens": 400,
                                "ignore_eos": True, "stream": True}) as r:
            for _ in r.iter_lines():
                started.set()
            streaming["status"] = r.status_code

    worker = threading.Thread(target=long_request)
    worker.start()
    assert started.wait(60)
    busy = server.post("reset_prefix_cache")
    worker.join()
    assert busy.status_code == 409 and busy.json()["error"]["type"] == "ConflictError"
    assert streaming["status"] == 200
    assert _cached(server) > 0  # not reset


def test_tls(tiny_models, tmp_path):
    """--ssl-keyfile / --ssl-certfile: https with the certificate, the openai client over
    it; the dev-mode route is absent without LORAPLEX_SERVER_DEV_MODE."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    key_file, cert_file, ca_file = (tmp_path / n for n in ("key.pem", "cert.pem", "ca.pem"))
    cert.private_key_pem.write_to_path(str(key_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    ca.cert_pem.write_to_path(str(ca_file))
    args = ["--dtype", "float32", "--max-model-len", "256", "--served-model-name", "tiny",
            "--ssl-keyfile", str(key_file), "--ssl-certfile", str(cert_file)]
    with RemoteServer(tiny_models["llama"], args, tls_ca=str(ca_file)) as srv:
        r = srv.get_client().chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens == 2
        assert r.usage.prompt_tokens_details is None  # not asked for
        with pytest.raises(httpx.HTTPError):  # no plain http on that port
            httpx.get(f"http://127.0.0.1:{srv.port}/health", timeout=5)
        with pytest.raises(httpx.HTTPError):  # nor https to a client without the CA
            httpx.get(srv.url_for("health"), timeout=5)
        assert srv.post("reset_prefix_cache").status_code == 404
        assert srv.get("docs").status_code == 200
