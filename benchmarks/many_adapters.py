"""Many adapters, long-tail traffic: throughput and latency as the adapter count grows.

Poisson arrivals, adapters drawn Zipf(1.0) over N registered adapters (N = 8, 128, 1024,
2000 by default); every adapter is a real PEFT directory on local disk (random weights),
registered up front without being read. Reports throughput, p50/p99 latency, the max
queue wait, and the adapter cache hit rates per tier, as JSON.

Burst scenario: steady traffic on a few warm adapters at half the measured capacity, then
a burst of requests for `--burst` cold adapters; the warm requests' p99 latency against
the same burst on resident adapters (same work, no loads) and against no burst. On a
shared CPU run with OMP_WAIT_POLICY=PASSIVE and nothing else busy.

    python benchmarks/many_adapters.py                          # CPU, small model
    python benchmarks/many_adapters.py --shape llama-3.2-1b --device cuda --rate 200
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, make_random_llama, make_tokenizer, write_json  # noqa: E402

from loraplex import EngineArgs, LLMEngine, LoRARequest, SamplingParams  # noqa: E402

SHAPES = {  # name -> (hidden, layers, heads, kv_heads, intermediate, vocab)
    "small-cpu": (256, 4, 4, 2, 768, 8192),
    "llama-3.2-1b": (2048, 16, 32, 8, 8192, 128256),
    "llama-3.1-8b": (4096, 32, 32, 8, 14336, 128256),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def write_adapters(root: Path, n: int, shape: tuple, rank: int) -> list[Path]:
    """n PEFT adapter dirs (fp16 random weights, r=rank on q/k/v/o); reused if present."""
    hidden, layers, heads, kv_heads = shape[:4]
    head_dim = hidden // heads
    out_dim = {"q_proj": hidden, "k_proj": kv_heads * head_dim, "v_proj": kv_heads * head_dim,
               "o_proj": hidden}
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": list(TARGETS), "task_type": "CAUSAL_LM"}
    dirs = []
    gen = torch.Generator().manual_seed(0)
    for i in tqdm(range(n), desc="writing adapters", leave=False):
        d = root / f"adapter{i:05d}"
        dirs.append(d)
        if (d / "adapter_model.safetensors").exists():
            continue
        d.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for layer in range(layers):
            for m in TARGETS:
                prefix = f"base_model.model.model.layers.{layer}.self_attn.{m}"
                tensors[f"{prefix}.lora_A.weight"] = (
                    0.02 * torch.randn(rank, hidden, generator=gen)).half()
                tensors[f"{prefix}.lora_B.weight"] = (
                    0.02 * torch.randn(out_dim[m], rank, generator=gen)).half()
        save_file(tensors, d / "adapter_model.safetensors")
        (d / "adapter_config.json").write_text(json.dumps(config))
    return dirs


def weight_sizes(shape: tuple, rank: int) -> dict:
    """Parameter counts: the base (untied lm_head) and one adapter. A decode step reads the
    base once and every distinct adapter in the batch once, so adapter / base says how
    much N distinct adapters can cost at most on a weight-bound step."""
    hidden, layers, heads, kv_heads, inter, vocab = shape
    kv = kv_heads * hidden // heads
    base = layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter) \
        + 2 * vocab * hidden
    adapter = layers * rank * (4 * hidden + 2 * hidden + 2 * kv)  # A: 4 x in, B: sum of outs
    return {"base_params": base, "adapter_params": adapter,
            "adapter_vs_base": adapter / base}


def make_engine(model_dir: Path, a: argparse.Namespace) -> LLMEngine:
    return LLMEngine.from_engine_args(EngineArgs(
        model=str(model_dir), dtype=a.dtype, device=a.device, load_format="dummy",
        enable_lora=True, max_loras=a.max_loras, max_cpu_loras=a.max_cpu_loras,
        max_lora_rank=a.rank, max_num_seqs=a.max_num_seqs,
        max_model_len=a.prompt_len + a.output_len + 16))


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))] if s else float("nan")


def run_trace(engine: LLMEngine, trace: list[tuple], a: argparse.Namespace, tag: str) -> dict:
    """Replay (arrival offset s, adapter, ...) in real time; returns per-request timings.
    Request k of the trace is f"{tag}-{k}"."""
    vocab = engine.model.args.vocab_size
    rng = random.Random(1)
    params = SamplingParams(temperature=0.0, max_tokens=a.output_len, ignore_eos=True)
    arrival: dict[str, float] = {}
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    lora_of: dict[str, int] = {}
    tokens = 0
    step_log: list[tuple[float, bool]] = []  # (end time, prefilled some prompt) per step
    start = time.perf_counter()
    nxt = 0
    with tqdm(total=len(trace), desc=tag, leave=False) as bar:
        while nxt < len(trace) or engine.has_unfinished_requests():
            now = time.perf_counter() - start
            while nxt < len(trace) and trace[nxt][0] <= now:
                rid, lora = f"{tag}-{nxt}", trace[nxt][1]
                prompt = [rng.randrange(3, vocab) for _ in range(a.prompt_len)]
                engine.add_request(rid, {"prompt_token_ids": prompt}, params, lora_request=lora)
                arrival[rid], lora_of[rid] = start + trace[nxt][0], lora.lora_int_id if lora else 0
                nxt += 1
            if not engine.has_unfinished_requests():
                time.sleep(min(0.01, max(0.0, trace[nxt][0] - now)))
                continue
            outs = engine.step()
            if a.device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            step_log.append((t, any(len(o.outputs[0].token_ids) == 1 for o in outs)))
            for o in outs:
                first.setdefault(o.request_id, t)
                if o.finished:
                    done[o.request_id] = t
                    tokens += len(o.outputs[0].token_ids)
                    bar.update(1)
    makespan = max(done.values()) - start
    return {"arrival": arrival, "first": first, "done": done, "lora": lora_of,
            "tokens": tokens, "makespan_s": makespan, "steps": step_log}


def summarize(r: dict, stats, ids: set[str] | None = None) -> dict:
    """Latencies over `ids` (default: every request); tokens and throughput always over the
    whole run (in the burst runs: the steady requests and the burst's together)."""
    ids = set(r["done"]) if ids is None else ids
    lat = [r["done"][i] - r["arrival"][i] for i in ids]
    wait = [r["first"][i] - r["arrival"][i] for i in ids]
    out = {"requests": len(ids), "output_tokens": r["tokens"],
           "throughput_tok_s": r["tokens"] / r["makespan_s"],
           "latency_p50_s": pct(lat, 50), "latency_p99_s": pct(lat, 99),
           "first_token_p99_s": pct(wait, 99), "max_first_token_wait_s": max(wait)}
    if stats is not None:
        c = stats.lora_cache
        activations = c.slot_hits + c.host_hits
        out["cache"] = {"slot_hit_rate": c.slot_hits / max(1, activations),
                        "host_hits": c.host_hits, "disk_loads": c.host_misses,
                        "load_failures": c.load_failures,
                        "load_p50_ms": 1e3 * pct(stats.lora_load_seconds, 50),
                        "load_p99_ms": 1e3 * pct(stats.lora_load_seconds, 99)}
    return out


def zipf_trace(n_adapters: int, reqs: list[LoRARequest], a: argparse.Namespace,
               seed: int) -> list[tuple[float, LoRARequest]]:
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) for k in range(n_adapters)]
    order = list(range(n_adapters))
    rng.shuffle(order)  # which adapter is hot is arbitrary
    t, trace = 0.0, []
    for k in rng.choices(range(n_adapters), weights=weights, k=a.requests):
        t += rng.expovariate(a.rate)
        trace.append((t, reqs[order[k]]))
    return trace


def bench_n(model_dir: Path, dirs: list[Path], n: int, a: argparse.Namespace) -> dict:
    engine = make_engine(model_dir, a)
    reqs = [LoRARequest(f"a{i}", i + 1, str(d)) for i, d in enumerate(dirs[:n])]
    with_reg = time.perf_counter()
    for r in reqs:
        engine.register_lora(r)
    register_s = time.perf_counter() - with_reg
    r = run_trace(engine, zipf_trace(n, reqs, a, seed=n), a, f"N={n}")
    stats = engine.get_stats()
    res = summarize(r, stats)
    res.update(num_adapters=n, register_all_s=register_s,
               distinct_adapters_used=len(set(r["lora"].values())))
    engine.lora_manager.loader.shutdown()
    return res


def bench_burst(model_dir: Path, dirs: list[Path], a: argparse.Namespace, rate: float
                ) -> dict:
    """Warm traffic on `--warm` resident adapters at `rate` (below capacity, so latency is
    service time, not a queue), then a burst of `--burst` requests at once, each for its
    own adapter. Three runs on the same arrivals:

    - none: no burst;
    - warm burst: the burst's adapters already sit in device slots (the same extra work
      and the same number of distinct adapters, no loads): the control;
    - cold burst: the burst's adapters are registered only, their weights on disk.

    cold / warm burst is what the loads cost the warm requests; cold burst / none adds
    the burst's own compute. Each kind runs `--burst-repeats` times; p99s are medians.
    The burst fits in the free slots (warm + burst <= max_loras), so this measures
    loading; sharing oversubscribed slots is the fairness test's topic.
    """
    if a.warm + a.burst > a.max_loras:
        raise SystemExit(f"--warm {a.warm} + --burst {a.burst} > --max-loras {a.max_loras}")
    kinds = ("none", "warm_burst", "cold_burst")
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for rep in range(a.burst_repeats):  # interleaved, so drift hits every kind alike
        for kind in kinds:
            runs[kind].append(_burst_run(model_dir, dirs, a, rate, kind, seed=7 + rep))
    p99 = {k: statistics.median(r["latency_p99_s"] for r in runs[k]) for k in kinds}
    return {"warm_rate_req_s": rate, "warm_adapters": a.warm,
            "cold_adapters_in_burst": a.burst, "repeats": a.burst_repeats,
            "warm_p99_median_s": p99, "runs": runs,
            "warm_p99_cold_vs_warm_burst": p99["cold_burst"] / p99["warm_burst"],
            "warm_p99_cold_burst_vs_none": p99["cold_burst"] / p99["none"]}


def _burst_run(model_dir: Path, dirs: list[Path], a: argparse.Namespace, rate: float,
               kind: str, seed: int) -> dict:
    """One burst-scenario run; the summary covers the steady (warm) requests only."""
    engine = make_engine(model_dir, a)
    warm = [LoRARequest(f"w{i}", i + 1, str(dirs[i])) for i in range(a.warm)]
    burst = [LoRARequest(f"b{i}", 10_000 + i, str(d))
             for i, d in enumerate(dirs[a.warm:a.warm + a.burst])]
    for w in warm:
        engine.add_lora(w)
    for b in burst:
        if kind == "cold_burst":
            engine.register_lora(b)  # registered, weights still on disk
        else:
            engine.add_lora(b)
    _prime(engine, warm + (burst if kind == "warm_burst" else []))
    rng = random.Random(seed)
    t, trace = 0.0, []  # (arrival, adapter, part of the burst)
    for _ in range(a.requests // 2):
        t += rng.expovariate(rate)
        trace.append((t, rng.choice(warm), False))
    t0 = trace[len(trace) // 3][0]  # the burst, a third of the way in
    if kind != "none":
        trace += [(t0 + 0.001 * i, lora, True) for i, lora in enumerate(burst)]
        trace.sort(key=lambda x: x[0])
    r = run_trace(engine, trace, a, kind)
    engine.lora_manager.loader.shutdown()
    steady = {f"{kind}-{k}" for k, (_, _, in_burst) in enumerate(trace) if not in_burst}
    out = summarize(r, None, steady)
    if kind != "none":  # steps from the burst's arrival to its last first token
        begin = min(r["arrival"][i] for i in r["arrival"] if i not in steady)
        end = max(r["first"][i] for i in r["first"] if i not in steady)
        window = [pre for t, pre in r["steps"] if begin < t <= end]
        out.update(burst_window_steps=len(window), burst_window_prefills=sum(window))
    return out


def _prime(engine: LLMEngine, loras: list[LoRARequest]) -> None:
    """One 1-token request per adapter, run to the end: each now holds a device slot."""
    params = SamplingParams(temperature=0.0, max_tokens=1)
    for i, lora in enumerate(loras):
        engine.add_request(f"prime-{i}", {"prompt_token_ids": [5, 6, 7]}, params,
                           lora_request=lora)
    while engine.has_unfinished_requests():
        engine.step()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="small-cpu")
    p.add_argument("--num-adapters", type=int, nargs="+", default=[8, 128, 1024, 2000])
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--rate", type=float, default=40.0,
                   help="arrivals per second (Poisson); above capacity = saturated throughput")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-loras", type=int, default=32)
    p.add_argument("--max-cpu-loras", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--warm", type=int, default=8, help="resident adapters in the burst runs")
    p.add_argument("--burst", type=int, default=24,
                   help="cold adapters in the burst run (warm + burst <= max-loras)")
    p.add_argument("--burst-repeats", type=int, default=3,
                   help="runs of each burst kind; the p99s compared are the medians")
    p.add_argument("--burst-load", type=float, default=0.5,
                   help="warm arrival rate in the burst run, as a fraction of the capacity "
                        "measured at the first N")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--workdir", default=None, help="where model and adapters are written")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    shape = SHAPES[a.shape]
    model_dir, dirs = model_and_adapters(a.shape, a.rank, a.workdir,
                                         max(max(a.num_adapters), a.max_loras + a.burst))
    device = "cuda" if a.device == "cuda" else "cpu"
    out = Path(a.out or Path(__file__).parent / "results" / f"many_adapters_{device}.json")
    results = {"machine": machine_info(), "args": vars(a), "weights": weight_sizes(shape, a.rank),
               "complete": False, "by_num_adapters": []}
    for n in a.num_adapters:
        res = bench_n(model_dir, dirs, n, a)
        results["by_num_adapters"].append(res)
        res["throughput_vs_first"] = (res["throughput_tok_s"]
                                      / results["by_num_adapters"][0]["throughput_tok_s"])
        print(f"N={n:5d}: {res['throughput_tok_s']:8.1f} tok/s  p50 {res['latency_p50_s']:.2f}s"
              f"  p99 {res['latency_p99_s']:.2f}s  max wait {res['max_first_token_wait_s']:.2f}s"
              f"  disk loads {res['cache']['disk_loads']}")
        write_json(out, results)  # after every N: a run cut by a time limit keeps them
    capacity = results["by_num_adapters"][0]["throughput_tok_s"] / a.output_len  # req/s
    results["burst"] = bench_burst(model_dir, dirs, a, a.burst_load * capacity)
    b = results["burst"]
    print(f"warm p99 during a burst of {a.burst} cold adapters: "
          f"{b['warm_p99_cold_vs_warm_burst']:.2f}x a burst of warm ones, "
          f"{b['warm_p99_cold_burst_vs_none']:.2f}x no burst")
    results["complete"] = True
    write_json(out, results)


def model_and_adapters(shape_name: str, rank: int, workdir: str | None, n: int
                       ) -> tuple[Path, list[Path]]:
    """The shape's model dir (random weights for small-cpu; else config and tokenizer
    only, for load_format='dummy') and n adapter dirs, written once and reused."""
    root = Path(workdir or tempfile.gettempdir()) / f"loraplex_many_{shape_name}_r{rank}"
    shape = SHAPES[shape_name]
    hidden, layers, heads, kv_heads, inter, vocab = shape
    model_dir = make_random_llama(root / "model", hidden=hidden, layers=layers, heads=heads,
                                  kv_heads=kv_heads, intermediate=inter, vocab=vocab) \
        if shape_name == "small-cpu" else _config_only(root / "model", shape)
    return model_dir, write_adapters(root / "adapters", n, shape, rank)


def _config_only(out_dir: Path, shape: tuple) -> Path:
    """A config + tokenizer dir for load_format='dummy' (no weights written)."""
    from transformers import LlamaConfig

    hidden, layers, heads, kv_heads, inter, vocab = shape
    if not (out_dir / "config.json").exists():
        LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                    num_key_value_heads=kv_heads, intermediate_size=inter, vocab_size=vocab,
                    max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                    torch_dtype="bfloat16").save_pretrained(out_dir)
        make_tokenizer(out_dir, vocab)
    return out_dir


if __name__ == "__main__":
    main()
