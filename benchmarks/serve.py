"""Online serving benchmark: N concurrent streaming clients over M adapters on `loraplex serve`.

Starts the real server as a subprocess, drives it over HTTP (SSE) and reports req/s,
output tok/s, TTFT, inter-token latency and end-to-end latency (p50/p99), as JSON.

    python benchmarks/serve.py                                   # small random model, CPU
    python benchmarks/serve.py --clients 32 --adapters 8 --requests 128
    python benchmarks/serve.py --model /path/to/model --adapter-paths a=/p/a b=/p/b
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, make_random_adapter, make_random_llama, write_json  # noqa: E402


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, adapters: dict[str, str], args: argparse.Namespace
                 ) -> tuple[subprocess.Popen, str]:
    return launch([model, "--dtype", args.dtype, "--max-model-len",
                   str(args.prompt_len + args.output_len + 8), "--max-num-seqs",
                   str(max(args.clients, 1)), "--enable-lora", "--max-loras",
                   str(args.max_loras), "--max-lora-rank", str(args.rank), "--max-cpu-loras",
                   str(max(len(adapters), args.max_loras)), "--lora-modules",
                   *[f"{n}={p}" for n, p in adapters.items()]],
                  {"LORAPLEX_CPU_KVCACHE_SPACE": str(args.kv_gib)})


def launch(serve_args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """`loraplex serve` on a free loopback port; returns once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "loraplex.entrypoints.cli", "serve", *serve_args, "--host",
           "127.0.0.1", "--port", str(port), "--uvicorn-log-level", "warning"]
    proc = subprocess.Popen(cmd, env=dict(os.environ, **env))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not become ready")


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: list[int],
                      output_len: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    chunk_times: list[float] = []
    tokens = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                raise RuntimeError(data["error"]["message"])
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            if data["choices"] and data["choices"][0]["text"]:
                chunk_times.append(time.perf_counter())
    end = time.perf_counter()
    return {"ttft": chunk_times[0] - start if chunk_times else None,
            "itl": [b - a for a, b in zip(chunk_times, chunk_times[1:])],
            "e2e": end - start, "tokens": tokens}


async def drive(url: str, models: list[str], args: argparse.Namespace) -> dict:
    rng = random.Random(0)
    jobs = [(models[i % len(models)], [rng.randrange(3, args.vocab) for _ in
                                        range(args.prompt_len)]) for i in range(args.requests)]
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    results: list[dict] = []
    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        # warm-up: every adapter once, so loads are not timed
        await asyncio.gather(*(one_request(client, url, m, [5, 6, 7], 2) for m in models))

        async def worker() -> None:
            while not queue.empty():
                model, prompt = queue.get_nowait()
                results.append(await one_request(client, url, model, prompt, args.output_len))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.clients)))
        wall = time.perf_counter() - start
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    itl = [x for r in results for x in r["itl"]]
    e2e = [r["e2e"] for r in results]
    out_tokens = sum(r["tokens"] for r in results)
    ms = 1000.0
    return {"requests": len(results), "wall_s": wall, "req_per_s": len(results) / wall,
            "out_tok_per_s": out_tokens / wall, "output_tokens": out_tokens,
            "ttft_ms": {"p50": pct(ttft, 50) * ms, "p99": pct(ttft, 99) * ms},
            "itl_ms": {"p50": pct(itl, 50) * ms, "p99": pct(itl, 99) * ms},
            "e2e_ms": {"p50": pct(e2e, 50) * ms, "p99": pct(e2e, 99) * ms}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Existing model dir (default: a random Llama built here).")
    p.add_argument("--adapter-paths", nargs="*", default=[], metavar="NAME=PATH",
                   help="Existing adapters (default: --adapters random ones).")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--adapters", type=int, default=4, help="M: adapters to spread over.")
    p.add_argument("--include-base", action="store_true", help="Also send base requests.")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--max-loras", type=int, default=2)
    p.add_argument("--clients", type=int, default=16, help="N: concurrent streaming clients.")
    p.add_argument("--requests", type=int, default=64, help="Total requests.")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--kv-gib", type=float, default=0.5, help="CPU KV cache (GiB).")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" /
                   "serve_cpu.json")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="loraplex-bench-serve-"))
    if args.model:
        model = args.model
    else:
        model = str(make_random_llama(work / "base", hidden=args.hidden, layers=args.layers,
                                      heads=max(args.hidden // 64, 1),
                                      kv_heads=max(args.hidden // 128, 1),
                                      intermediate=args.hidden * 2, vocab=args.vocab))
    if args.adapter_paths:
        adapters = dict(a.split("=", 1) for a in args.adapter_paths)
    else:
        adapters = {f"a{i}": str(make_random_adapter(
            Path(model), work / f"a{i}", r=args.rank,
            targets=["q_proj", "k_proj", "v_proj", "o_proj"], seed=i))
            for i in range(args.adapters)}
    models = list(adapters) + ([model] if args.include_base else [])
    proc, url = start_server(model, adapters, args)
    try:
        stats = asyncio.run(drive(url, models, args))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    result = {"benchmark": "serve", "config": {k: (str(v) if isinstance(v, Path) else v)
                                               for k, v in vars(args).items()},
              "machine": machine_info(), **stats}
    print(json.dumps({k: result[k] for k in ("req_per_s", "out_tok_per_s", "ttft_ms",
                                             "itl_ms", "e2e_ms")}, indent=2))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
