"""Thousands of adapters over HTTP: `loraplex serve` with a resolver directory of N.

The server starts with no adapter; the filesystem resolver finds each one the first time
a request names it (read on a thread, then registered), so the adapters in use pile up
as they would behind a multi-tenant gateway. Streaming completions arrive as a Poisson
process, each naming an adapter drawn Zipf(1.0) over the N; meanwhile a scraper GETs
/metrics every `--scrape-interval` seconds. Reports throughput, TTFT and end-to-end
latency, the scrapes' size and latency, how many adapters got registered, and one
/v1/models listing at the end, per N.

    python benchmarks/serve_many_adapters.py                    # N = 8 and 2000, CPU
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_json  # noqa: E402
from many_adapters import model_and_adapters  # noqa: E402
from serve import launch, one_request, pct  # noqa: E402


async def scrape(client: httpx.AsyncClient, url: str, interval: float, done: asyncio.Event,
                 out: list[dict]) -> None:
    while not done.is_set():
        start = time.perf_counter()
        r = await client.get(f"{url}/metrics")
        out.append({"s": time.perf_counter() - start, "bytes": len(r.content)})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), interval)


def registered_adapters(metrics_text: str) -> int:
    for line in metrics_text.splitlines():
        if line.startswith('loraplex:lora_adapters{tier="registered"}'):
            return int(float(line.split()[-1]))
    return 0


async def drive(url: str, names: list[str], a: argparse.Namespace) -> dict:
    rng = random.Random(0)
    weights = [1.0 / (i + 1) for i in range(len(names))]  # Zipf(1.0) by rank
    jobs = [(t, rng.choices(names, weights)[0],
             [rng.randrange(3, a.vocab) for _ in range(a.prompt_len)])
            for t in _poisson_times(rng, a.rate, a.requests)]
    results: list[dict] = []
    scrapes: list[dict] = []
    limits = httpx.Limits(max_connections=a.requests + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        done = asyncio.Event()
        scraper = asyncio.create_task(scrape(client, url, a.scrape_interval, done, scrapes))
        start = time.perf_counter()

        async def send(at: float, model: str, prompt: list[int], first: bool) -> None:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            r = await one_request(client, url, model, prompt, a.output_len)
            results.append(r | {"first": first})
        firsts, seen = [], set()
        for _, model, _ in jobs:  # in arrival order: is this the adapter's first request
            firsts.append(model not in seen)
            seen.add(model)
        await asyncio.gather(*(send(*job, first) for job, first in zip(jobs, firsts)))
        wall = time.perf_counter() - start
        done.set()
        await scraper
        t = time.perf_counter()
        listing = await client.get(f"{url}/v1/models")
        models_s = time.perf_counter() - t
        final = (await client.get(f"{url}/metrics")).text
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    warm = [r["ttft"] for r in results if r["ttft"] is not None and not r["first"]]
    cold = [r["ttft"] for r in results if r["ttft"] is not None and r["first"]]
    e2e = [r["e2e"] for r in results]
    out_tokens = sum(r["tokens"] for r in results)
    def ms(values: list[float], q: float) -> float | None:
        return None if not values else pct(values, q) * 1000.0
    return {
        "requests": len(results), "wall_s": wall, "out_tok_per_s": out_tokens / wall,
        "distinct_adapters_requested": len({job[1] for job in jobs}),
        "registered_at_end": registered_adapters(final),
        "ttft_ms": {"p50": ms(ttft, 50), "p99": ms(ttft, 99)},
        # an adapter's first request waits for the resolver and the read; later ones not
        "ttft_first_request_ms": {"p50": ms(cold, 50), "p99": ms(cold, 99)},
        "ttft_later_requests_ms": {"p50": ms(warm, 50), "p99": ms(warm, 99)},
        "e2e_ms": {"p50": ms(e2e, 50), "p99": ms(e2e, 99)},
        "scrapes": len(scrapes),
        "scrape_bytes_max": max(s["bytes"] for s in scrapes),
        "scrape_ms": {"p50": ms([s["s"] for s in scrapes], 50),
                      "max": ms([s["s"] for s in scrapes], 100)},
        "final_scrape_bytes": len(final.encode()),
        "models_listing": {"adapters": len(listing.json()["data"]) - 1,
                           "bytes": len(listing.content), "ms": models_s * 1000.0},
    }


def _poisson_times(rng: random.Random, rate: float, n: int) -> list[float]:
    t, times = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        times.append(t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-adapters", type=int, nargs="+", default=[8, 2000])
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--rate", type=float, default=30.0, help="arrivals per second (Poisson)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--max-loras", type=int, default=32)
    ap.add_argument("--max-cpu-loras", type=int, default=128)
    ap.add_argument("--scrape-interval", type=float, default=1.0)
    ap.add_argument("--workdir", default=None, help="where model and adapters are written")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" /
                    "serve_many_adapters_cpu.json")
    a = ap.parse_args()
    model_dir, dirs = model_and_adapters("small-cpu", 16, a.workdir, max(a.num_adapters))
    a.vocab = 8192  # the small-cpu shape's
    results = {"benchmark": "serve_many_adapters", "machine": machine_info(),
               "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
               "by_num_adapters": []}
    for n in a.num_adapters:
        # the resolver serves <dir>/<name>: a directory holding exactly the first n
        pool = dirs[0].parent.parent / f"pool{n}"
        pool.mkdir(exist_ok=True)
        for d in dirs[:n]:
            if not (pool / d.name).exists():
                (pool / d.name).symlink_to(d, target_is_directory=True)
        proc, url = launch(
            [str(model_dir), "--enable-lora", "--max-loras", str(a.max_loras),
             "--max-cpu-loras", str(a.max_cpu_loras), "--max-lora-rank", "16",
             "--max-num-seqs", "64", "--max-model-len", str(a.prompt_len + a.output_len + 8)],
            {"LORAPLEX_ALLOW_RUNTIME_LORA_UPDATING": "true", "LORAPLEX_LOGGING_LEVEL": "WARNING",
             "LORAPLEX_PLUGINS": "lora_filesystem_resolver",
             "LORAPLEX_LORA_RESOLVER_CACHE_DIR": str(pool)})
        try:
            res = {"num_adapters": n, **asyncio.run(drive(url, [d.name for d in dirs[:n]], a))}
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        results["by_num_adapters"].append(res)
        def f(v: float | None) -> str:
            return "-" if v is None else f"{v:.0f}"
        ttft, later = res["ttft_ms"], res["ttft_later_requests_ms"]
        print(f"N={n}: {res['out_tok_per_s']:.0f} tok/s, TTFT p50/p99 "
              f"{f(ttft['p50'])}/{f(ttft['p99'])} ms (an adapter's "
              f"later requests {f(later['p50'])}/{f(later['p99'])}), "
              f"{res['registered_at_end']} registered, scrapes up to "
              f"{res['scrape_bytes_max'] / 1e3:.0f} kB in {res['scrape_ms']['max']:.0f} ms, "
              f"/v1/models {res['models_listing']['bytes'] / 1e3:.0f} kB", flush=True)
        write_json(a.out, results)


if __name__ == "__main__":
    main()
