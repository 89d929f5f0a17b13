"""`loraplex run-batch` (vLLM's batch runner) on a real tiny model and adapters: an OpenAI
batch file of completions and chat requests for the base and more adapters than slots,
each result the offline LLM's for the same request, written in input order; every bad
line fails alone with its status and OpenAI's error object; input fetched from and output
uploaded to an http server on loopback, with Prometheus metrics served meanwhile."""

from __future__ import annotations

import json
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from loraplex import LLM, SamplingParams
from loraplex.entrypoints.cli import main
from loraplex.lora.request import LoRARequest
from tests.server_utils import free_port

ADAPTERS = ("r4_qv", "r8_all")
GREEDY = {"temperature": 0, "max_tokens": 6, "ignore_eos": True}
MESSAGES = [{"role": "user", "content": "Tell me a story"}]


def _line(custom_id: str, url: str, body: dict, method: str = "POST") -> str:
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


def _good_lines() -> list[tuple[str, str, dict]]:
    """(custom_id, url, body) of the requests that must succeed."""
    lines = []
    for model in ("tiny", *ADAPTERS):
        lines.append((f"cmpl-{model}", "/v1/completions",
                      {"model": model, "prompt": "Once upon a time", **GREEDY}))
        lines.append((f"chat-{model}", "/v1/chat/completions",
                      {"model": model, "messages": MESSAGES, **GREEDY}))
    return lines


def _args(model: Path, adapters: dict[str, Path], inp: str, out: str) -> list[str]:
    return ["run-batch", "--model", str(model), "-i", inp, "-o", out,
            "--served-model-name", "tiny", "--enable-lora", "--max-loras", "1",
            "--max-lora-rank", "16", "--dtype", "float32", "--max-model-len", "256",
            "--cpu-kv-cache-gib", "0.05",
            "--lora-modules", *(f"{n}={adapters[n]}" for n in ADAPTERS)]


@pytest.fixture(scope="module")
def expected(tiny_models, tiny_adapters) -> dict[str, str]:
    """custom_id -> the offline LLM's text for the same request, adapter and all."""
    llm = LLM(str(tiny_models["llama"]), dtype="float32", max_model_len=256,
              cpu_kv_cache_gib=0.05, enable_lora=True, max_loras=1, max_lora_rank=16)
    loras = {n: LoRARequest(n, i + 1, str(tiny_adapters["llama"][n]))
             for i, n in enumerate(ADAPTERS)}
    params = SamplingParams(**GREEDY)
    out = {}
    for custom_id, url, body in _good_lines():
        lora = loras.get(body["model"])
        if url == "/v1/completions":
            result = llm.generate(body["prompt"], params, lora_request=lora, use_tqdm=False)
        else:
            result = llm.chat(MESSAGES, params, lora_request=lora, use_tqdm=False)
        out[custom_id] = result[0].outputs[0].text
    return out


def test_a_batch_file_with_good_and_bad_lines(tiny_models, tiny_adapters, expected, tmp_path):
    bad = [
        _line("unknown-model", "/v1/completions", {"model": "nope", "prompt": "x"}),
        _line("streamed", "/v1/chat/completions",
              {"model": "tiny", "messages": MESSAGES, "stream": True}),
        _line("bad-temperature", "/v1/completions",
              {"model": "r4_qv", "prompt": "x", "temperature": -1}),
        _line("no-messages", "/v1/chat/completions", {"model": "tiny"}),
        _line("unknown-url", "/v1/images/generations", {"model": "tiny"}),
        _line("embeddings-here", "/v1/embeddings", {"model": "tiny", "input": "x"}),
        _line("get", "/v1/completions", {"model": "tiny", "prompt": "x"}, method="GET"),
        '{"custom_id": "no-url", "body": {}}',
        "{not json",
    ]
    good = [_line(*g) for g in _good_lines()]
    lines = [x for pair in zip(good, bad[:len(good)]) for x in pair] + bad[len(good):]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n\n")
    assert main(_args(tiny_models["llama"], tiny_adapters["llama"], str(inp), str(out))) == 0
    results = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["custom_id"] for r in results] == [
        json.loads(x).get("custom_id") if x.startswith('{"') else None for x in lines]
    assert len({r["id"] for r in results}) == len(results)
    by_id = {r["custom_id"]: r for r in results}
    for custom_id, text in expected.items():
        r = by_id[custom_id]
        assert r["error"] is None and r["response"]["status_code"] == 200
        body = r["response"]["body"]
        got = body["choices"][0]["text" if custom_id.startswith("cmpl") else "message"]
        assert (got if isinstance(got, str) else got["content"]) == text, custom_id
        assert body["model"] == custom_id.split("-", 1)[1]
        assert body["usage"]["completion_tokens"] == 6
    want = {"unknown-model": (404, "nope"), "streamed": (400, "stream mode"),
            "bad-temperature": (400, "temperature"), "no-messages": (400, "messages"),
            "unknown-url": (404, "/v1/images/generations is not supported"),
            "embeddings-here": (404, "does not support Embeddings API"),
            "get": (400, "only POST"), "no-url": (400, "url"), None: (400, "not a batch")}
    for custom_id, (status, message) in want.items():
        r = by_id[custom_id]
        assert r["response"]["status_code"] == status and r["response"]["body"] is None
        assert r["error"]["code"] == status and message in r["error"]["message"], r


class _Files(BaseHTTPRequestHandler):
    """GET serves `files`; PUT stores the body into `files`."""

    files: dict[str, bytes] = {}

    def do_GET(self):  # noqa: N802
        data = self.files.get(self.path)
        self.send_response(200 if data is not None else 404)
        self.end_headers()
        self.wfile.write(data or b"")

    def do_PUT(self):  # noqa: N802
        self.files[self.path] = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_urls_in_and_out_and_metrics(tiny_models, tiny_adapters, expected, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    _Files.files["/in.jsonl"] = "\n".join(_line(*g) for g in _good_lines()).encode()
    port = free_port()
    try:
        args = _args(tiny_models["llama"], tiny_adapters["llama"], f"{base}/in.jsonl",
                     f"{base}/out.jsonl")
        assert main([*args, "--enable-metrics", "--url", "127.0.0.1", "--port",
                     str(port), "--output-tmp-dir", str(tmp_path)]) == 0
        results = [json.loads(x) for x in _Files.files["/out.jsonl"].decode().splitlines()]
        assert [r["custom_id"] for r in results] == [g[0] for g in _good_lines()]
        assert results[0]["response"]["body"]["choices"][0]["text"] == expected["cmpl-tiny"]
        assert not list(tmp_path.iterdir())  # the local copy is gone after the upload
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        served = [float(x.split()[-1]) for x in metrics.splitlines()
                  if x.startswith("loraplex:generation_tokens_total")]
        assert sum(served) == 6 * len(results)
    finally:
        server.shutdown()


def test_a_missing_input_file_is_a_clear_error(tiny_models, tiny_adapters, tmp_path, capsys):
    args = _args(tiny_models["llama"], tiny_adapters["llama"], str(tmp_path / "none.jsonl"),
                 str(tmp_path / "out.jsonl"))
    assert main(args) != 0
    assert "--input-file" in capsys.readouterr().err


def test_an_embeddings_batch(tiny_models, tiny_adapters, tmp_path):
    """--runner pooling: /v1/embeddings lines under the base and the adapters, each the
    offline LLM.embed's vector; a chat line there fails alone (404)."""
    inputs = ["Once upon a time", "The quick brown fox"]
    lines = [_line(f"emb-{m}", "/v1/embeddings", {"model": m, "input": inputs})
             for m in ("tiny", *ADAPTERS)]
    lines.append(_line("chat-here", "/v1/chat/completions",
                       {"model": "tiny", "messages": MESSAGES}))
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines))
    args = _args(tiny_models["llama"], tiny_adapters["llama"], str(inp), str(out))
    assert main([*args, "--runner", "pooling"]) == 0
    results = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    llm = LLM(str(tiny_models["llama"]), runner="pooling", dtype="float32",
              max_model_len=256, cpu_kv_cache_gib=0.05, enable_lora=True, max_loras=1,
              max_lora_rank=16)
    for i, model in enumerate(("tiny", *ADAPTERS)):
        lora = None if model == "tiny" else LoRARequest(
            model, i, str(tiny_adapters["llama"][model]))
        want = [o.outputs.embedding for o in llm.embed(inputs, lora_request=lora,
                                                        use_tqdm=False)]
        body = results[f"emb-{model}"]["response"]["body"]
        got = [d["embedding"] for d in body["data"]]
        assert body["model"] == model and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g == pytest.approx(w, abs=1e-5)
    chat = results["chat-here"]
    assert chat["response"]["status_code"] == 404
    assert "does not support Chat Completions API" in chat["error"]["message"]

