"""Start the real `loraplex serve` as a subprocess on 127.0.0.1 and talk to it."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest

from loraplex import LoRARequest, SamplingParams
from loraplex.lora.errors import LoRAError
from tests.engine_utils import make_llm

SERVER_START_TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_cmd(model: str | Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "loraplex.entrypoints.cli", "serve", str(model), *args]


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The parent's env minus LORAPLEX_* (tests say what they want), small CPU KV cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    env["LORAPLEX_CPU_KVCACHE_SPACE"] = "0.05"
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.update(extra or {})
    return env


class RemoteServer:
    """One server process; ``close()`` (or the context manager) stops it."""

    def __init__(self, model: str | Path, args: list[str], env: dict[str, str] | None = None,
                 api_key: str | None = None, tls_ca: str | None = None) -> None:
        """`tls_ca`: the server serves https (its --ssl-* args), with a certificate this CA
        file vouches for."""
        self.port = free_port()
        self.api_key = api_key
        self.verify: ssl.SSLContext | bool = (ssl.create_default_context(cafile=tls_ca)
                                              if tls_ca else True)
        self.scheme = "https" if tls_ca else "http"
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the server
            "w+", prefix="loraplex-server-", suffix=".log",
            delete=False)
        cmd = serve_cmd(model, "--host", "127.0.0.1", "--port", str(self.port),
                        "--uvicorn-log-level", "warning", *args)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=clean_env(env))
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def url_for(self, *parts: str) -> str:
        return "/".join([self.url, *(p.strip("/") for p in parts)])

    def logs(self) -> str:
        return Path(self.log.name).read_text()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(self.url_for("health"), timeout=2,
                             verify=self.verify).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {SERVER_START_TIMEOUT}s:\n{self.logs()}")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def get(self, path: str, headers: dict[str, str] | None = None, **kw) -> httpx.Response:
        return httpx.get(self.url_for(path), headers={**self.headers(), **(headers or {})},
                         timeout=60, verify=self.verify, **kw)

    def post(self, path: str, json=None, headers: dict[str, str] | None = None,
             **kw) -> httpx.Response:
        """POST a JSON body (or raw bytes as given)."""
        if isinstance(json, bytes):
            kw["content"] = json
            json = None
        return httpx.post(self.url_for(path), json=json,
                          headers={**self.headers(), **(headers or {})}, timeout=60,
                          verify=self.verify, **kw)

    def get_client(self, **kw) -> openai.OpenAI:
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 60)
        if self.scheme == "https":
            kw.setdefault("http_client", httpx.Client(verify=self.verify))
        return openai.OpenAI(base_url=self.url_for("v1"), api_key=self.api_key or "unused",
                             **kw)

    def get_async_client(self, **kw) -> openai.AsyncOpenAI:
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 60)
        return openai.AsyncOpenAI(base_url=self.url_for("v1"),
                                  api_key=self.api_key or "unused", **kw)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)

    def __enter__(self) -> RemoteServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def token_ids_of(choice_logprobs) -> list[int]:
    """Ids from logprob tokens rendered with return_tokens_as_token_ids."""
    return [int(t.split(":", 1)[1]) for t in choice_logprobs.tokens]


def check_rank_refused(base: Path, good: tuple[str, Path], bad: tuple[str, Path],
                       prompts: list[list[int]]) -> None:
    """With max_lora_rank 4, the rank-8 adapter `bad` is refused by name, in the engine and
    over HTTP (a 400 in OpenAI's shape, then a 404 for its name); the rank-4 one `good`
    then serves, over HTTP the engine's tokens."""
    good_req = LoRARequest(good[0], 2, str(good[1]))
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=4)
    greedy = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    with pytest.raises(LoRAError, match="rank 8 > max_lora_rank=4"):
        llm.generate([{"prompt_token_ids": prompts[0]}], greedy,
                     lora_request=LoRARequest(bad[0], 1, str(bad[1])), use_tqdm=False)
    want = llm.generate([{"prompt_token_ids": prompts[1]}], greedy, lora_request=good_req,
                        use_tqdm=False)[0].outputs[0].token_ids
    assert len(want) == 3
    args = ["--enable-lora", "--max-loras", "1", "--max-lora-rank", "4", "--max-model-len",
            "128", "--dtype", "float32", "--lora-modules", f"{good[0]}={good[1]}"]
    env = {"LORAPLEX_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    with RemoteServer(base, args, env=env) as server:
        r = server.post("/v1/load_lora_adapter", {"lora_name": bad[0], "lora_path": str(bad[1])})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert "max_lora_rank=4" in err["message"] and err["type"] == "BadRequestError"
        client = server.get_client()
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=bad[0], prompt=prompts[0], max_tokens=2)
        r = client.completions.create(model=good[0], prompt=prompts[1], max_tokens=3,
                                      temperature=0, logprobs=0,
                                      extra_body={"return_tokens_as_token_ids": True,
                                                  "ignore_eos": True})
        assert token_ids_of(r.choices[0].logprobs) == list(want)
