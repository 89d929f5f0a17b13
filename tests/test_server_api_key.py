"""A server without LoRA, with --api-key, two served names and a --chat-template file."""

from __future__ import annotations

import openai
import pytest

from tests.server_utils import RemoteServer

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    template = tmp_path_factory.mktemp("tmpl") / "chat.jinja"
    template.write_text(TEMPLATE)
    with RemoteServer(tiny_models["qwen2"],
                      ["--api-key", "sekret", "--served-model-name", "qw", "qw-alias",
                       "--max-model-len", "96", "--chat-template", str(template)],
                      api_key="sekret") as srv:
        yield srv


def test_key_required_on_v1_routes(server):
    import httpx
    assert httpx.get(server.url_for("health")).status_code == 200
    assert httpx.get(server.url_for("metrics")).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
        r = httpx.get(server.url_for("v1/models"), headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "AuthenticationError"
    assert server.get("/v1/models").status_code == 200
    bad = openai.OpenAI(base_url=server.url_for("v1"), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="qw", prompt="Hi", max_tokens=2)


def test_served_names_and_chat_template(server, tokenizer):
    client = server.get_client()
    ids = {c.id for c in client.models.list().data}
    assert ids == {"qw", "qw-alias"}
    messages = [{"role": "user", "content": "Hello there"}]
    r = client.chat.completions.create(model="qw-alias", messages=messages, max_tokens=3)
    assert r.model == "qw-alias"
    want = len(tokenizer("[user] Hello there\n[assistant]", add_special_tokens=False).input_ids)
    assert r.usage.prompt_tokens == want


def test_lora_routes_and_names_without_lora(server):
    client = server.get_client()
    r = server.post("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/x"})
    assert r.status_code == 404
    assert "LORAPLEX_ALLOW_RUNTIME_LORA_UPDATING" in r.json()["error"]["message"]
    assert server.post("/v1/unload_lora_adapter", b"garbage").status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="some-adapter", prompt="Hi", max_tokens=2)
    assert client.completions.create(model="qw", prompt="Hi", max_tokens=2).choices
