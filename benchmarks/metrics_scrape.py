"""/metrics at thousands of adapters: what one Prometheus scrape costs the server.

Feeds the server's own `Metrics` (the calls the engine makes for each request) with
requests over N adapters, then renders the exposition text as GET /metrics does and
records its size, samples and render time: for the server's labels (latency histograms
per served model, as vLLM; no `_created` samples), for `--per-adapter-latency-metrics`, and
for the exposition before session 5 (histograms per adapter and `_created` samples, as
prometheus_client writes by default). It also measures what
a render does to the event loop that streams every response: the longest gap between
1 ms ticks of an asyncio task while one render runs on the loop (how GET /metrics was
served before) or on a worker thread (a plain-def route, how it is served now); the
median over the repeats.

    python benchmarks/metrics_scrape.py
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

from prometheus_client import disable_created_metrics, enable_created_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_json  # noqa: E402

from loraplex.metrics import Metrics  # noqa: E402

# (per_adapter_latency, `_created` samples): the server's default and its opt-in (the
# server drops `_created`), and the exposition before session 5 (both on)
CONFIGS = [(False, False), (True, False), (True, True)]


def filled_metrics(n_adapters: int, per_adapter: bool, requests_each: int) -> Metrics:
    """Every adapter (and the base) served `requests_each` requests of 16 tokens."""
    metrics = Metrics("base", per_adapter_latency=per_adapter)
    for model in ["base", *(f"adapter-{i}" for i in range(n_adapters))]:
        for k in range(requests_each):
            metrics.observe_token(model, 0.05 + 0.01 * k, first=True)
            for _ in range(15):
                metrics.observe_token(model, 0.02, first=False)
            metrics.observe_finished(model, "length" if k % 2 else "stop", 32, 16, 0.4)
    return metrics


def render_seconds(metrics: Metrics, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        metrics.render()
        times.append(time.perf_counter() - t)
    return times


async def longest_loop_gap(metrics: Metrics, on_thread: bool) -> float:
    """The event loop's longest pause (s) between 1 ms ticks while one render runs."""
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.02)
    if on_thread:
        await asyncio.to_thread(metrics.render)
    else:
        metrics.render()
    await asyncio.sleep(0.02)
    done.set()
    await task
    return max(gaps)


def median_gap(metrics: Metrics, on_thread: bool, repeats: int) -> float:
    return statistics.median(asyncio.run(longest_loop_gap(metrics, on_thread))
                             for _ in range(repeats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapters", type=int, nargs="+", default=[8, 128, 1024, 2000, 10000])
    ap.add_argument("--requests-each", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).parent / "results" / "metrics_scrape_cpu.json")
    a = ap.parse_args()
    rows = []
    for n in a.adapters:
        for per_adapter, created in CONFIGS:
            (enable_created_metrics if created else disable_created_metrics)()
            metrics = filled_metrics(n, per_adapter, a.requests_each)
            text = metrics.render()
            times = render_seconds(metrics, a.repeats)
            row = {
                "adapters": n, "per_adapter_latency": per_adapter, "created_series": created,
                "bytes": len(text),
                "samples": sum(1 for line in text.splitlines()
                               if line and not line.startswith(b"#")),
                "render_ms_median": 1000 * statistics.median(times),
                "render_ms_max": 1000 * max(times),
                "loop_gap_ms_on_loop": 1000 * median_gap(metrics, False, a.repeats),
                "loop_gap_ms_on_thread": 1000 * median_gap(metrics, True, a.repeats),
            }
            rows.append(row)
            print(f"N={n:>5} per_adapter_latency={per_adapter!s:5} _created={created!s:5} "
                  f"{row['bytes'] / 1e6:7.2f} MB "
                  f"{row['samples']:>7} samples  render {row['render_ms_median']:8.1f} ms  "
                  f"loop gap: on loop {row['loop_gap_ms_on_loop']:8.1f} ms, on a thread "
                  f"{row['loop_gap_ms_on_thread']:6.1f} ms", flush=True)
    write_json(a.out, {"benchmark": "metrics_scrape", "config": vars(a) | {"out": str(a.out)},
                       "machine": machine_info(), "results": rows})


if __name__ == "__main__":
    main()
