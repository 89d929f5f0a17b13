"""PNG plots of the benchmark JSON in benchmarks/results/, written to docs/images/.

    pip install -e '.[bench]' && python benchmarks/plot.py

Each plot reads one kind of result file; a file that does not exist yet (a GPU run, a
benchmark nobody has run) is skipped with a note. To plot a new benchmark, add a function
and its file pattern to PLOTS.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODE_LABELS = {"base": "base (no LoRA)", "one": "one adapter for all",
               "mixed": "every sequence a different adapter"}
MODE_COLORS = {"base": "tab:gray", "one": "tab:blue", "mixed": "tab:orange"}


def _machine(data: dict) -> str:
    m = data.get("machine", {})
    where = m.get("gpu") or f"{m.get('cpu_count', '?')} CPU cores"
    return f"{where}, torch {m.get('torch', '?')}"


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def plot_throughput(data: dict, out: Path) -> None:
    """Offline throughput by number of adapters in the batch, loraplex vs HF + PEFT."""
    c, res = data["config"], data["results"]
    cases = [("base", "base model\n(no adapter)"), ("one", "1 adapter\nfor all"),
             ("mixed", f"{c['adapters']} adapters\nmixed")]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.38
    for k, (engine, label, color) in enumerate([("loraplex", "loraplex", "tab:orange"),
                                                 ("hf", "HF transformers + PEFT", "tab:gray")]):
        xs = [i + (k - 0.5) * width for i in range(len(cases))]
        ys = [res.get(f"{engine}_{case}", {}).get("out_tok_s", 0.0) for case, _ in cases]
        bars = ax.bar(xs, ys, width, label=label, color=color)
        ax.bar_label(bars, fmt="%.0f", padding=2, fontsize=8)
    ax.set_xticks(range(len(cases)), [label for _, label in cases])
    ax.set_ylabel("output tokens / s (whole generate, prefill included)")
    ax.set_title(f"Offline throughput: {c['batch']} prompts x {c['prompt_len']} tokens, "
                 f"{c['new_tokens']} new\nLlama h{c['hidden']} x {c['layers']} layers, "
                 f"LoRA r{c['rank']}; {_machine(data)}", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.margins(y=0.12)
    _save(fig, out)


def plot_decode_step(data: dict, out: Path) -> None:
    """Decode ms/step vs batch size per mode, with the weight-read floor."""
    recs = data["results"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for engine, style in (("loraplex", "-o"), ("hf_peft", "--x")):
        for mode in MODE_LABELS:
            rows = sorted((r for r in recs if r["engine"] == engine and r["mode"] == mode),
                          key=lambda r: r["batch"])
            if rows:
                name = "loraplex" if engine == "loraplex" else "HF + PEFT"
                ax.plot([r["batch"] for r in rows], [r["ms_median"] for r in rows], style,
                        color=MODE_COLORS[mode], label=f"{name}: {MODE_LABELS[mode]}")
    batches = sorted({r["batch"] for r in recs})
    ax.axhline(data["weight_floor_ms"], color="black", linestyle=":",
               label=f"floor: weights / copy bandwidth ({data['weight_bytes'] / 1e9:.2f} GB "
                     f"/ {data['copy_bandwidth_gb_s']:.1f} GB/s)")
    mixed = sorted((r for r in recs if r["engine"] == "loraplex" and r["mode"] == "mixed"),
                   key=lambda r: r["batch"])
    if mixed:
        ax.plot([r["batch"] for r in mixed], [r["floor_ms"] for r in mixed], ":",
                color=MODE_COLORS["mixed"], alpha=0.6,
                label="floor + adapters + KV read (mixed)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("batch size (sequences decoding together)")
    ax.set_ylabel("ms per decode step (median, best round)")
    c = data["config"]
    ax.set_title(f"Decode step, {c['shape']} ({data['dtype']}, LoRA r{c['rank']} on "
                 f"{len(c['targets'])} projections), {data['device']}: {_machine(data)}",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    _save(fig, out)


def plot_serve(data: dict, out: Path) -> None:
    """Server latency percentiles: time to first token, inter-token, end to end."""
    c = data["config"]
    metrics = [("ttft_ms", "time to first token"), ("itl_ms", "inter-token latency"),
               ("e2e_ms", "end-to-end")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(9, 3.6))
    for ax, (key, title) in zip(axes, metrics):
        bars = ax.bar(["p50", "p99"], [data[key]["p50"], data[key]["p99"]],
                      color=["tab:blue", "tab:red"])
        ax.bar_label(bars, fmt="%.1f", padding=2, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("ms")
        ax.margins(y=0.15)
    fig.suptitle(f"loraplex serve: {c['clients']} streaming clients over {c['adapters']} "
                 f"adapters (max_loras {c['max_loras']}), {c['requests']} requests -> "
                 f"{data['req_per_s']:.1f} req/s, {data['out_tok_per_s']:.0f} out tok/s\n"
                 f"Llama h{c['hidden']} x {c['layers']} layers, prompt {c['prompt_len']}, "
                 f"output {c['output_len']}; {_machine(data)}", fontsize=9)
    _save(fig, out)


def plot_serve_many_adapters(data: dict, out: Path) -> None:
    """Over HTTP: time to first token by number of adapters behind the resolver."""
    rows, c = data["by_num_adapters"], data["config"]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    x = range(len(rows))
    for k, (q, color) in enumerate((("p50", "tab:blue"), ("p99", "tab:red"))):
        bars = ax.bar([i + 0.4 * k for i in x], [r["ttft_ms"][q] for r in rows], width=0.4,
                      color=color, label=f"TTFT {q}")
        ax.bar_label(bars, fmt="%.0f", padding=2, fontsize=8)
    ax.set_xticks([i + 0.2 for i in x],
                  [f"N={r['num_adapters']}\n{r['registered_at_end']} registered"
                   for r in rows])
    ax.set_ylabel("ms")
    ax.margins(y=0.15)
    ax.legend(fontsize=8)
    ax.set_title(f"loraplex serve, adapters via the filesystem resolver, max_loras "
                 f"{c['max_loras']}\n{c['requests']} requests at {c['rate']:g} req/s, Zipf "
                 f"over N; {_machine(data)}", fontsize=9)
    _save(fig, out)


def plot_many_adapters(data: dict, out: Path) -> None:
    """Throughput and p99 latency vs the number of registered adapters (Zipf traffic)."""
    rows = data["by_num_adapters"]
    n = [r["num_adapters"] for r in rows]
    a = data["args"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.plot(n, [r["throughput_tok_s"] for r in rows], "o-")
    left.set_ylabel("output tok/s")
    left.set_ylim(bottom=0)
    right.plot(n, [r["latency_p99_s"] for r in rows], "o-", color="tab:red", label="p99")
    right.plot(n, [r["latency_p50_s"] for r in rows], "o--", color="tab:blue", label="p50")
    right.set_ylabel("request latency (s)")
    right.set_ylim(bottom=0)
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("registered adapters N (Zipf 1.0 traffic)")
    burst = data.get("burst", {})
    fig.suptitle(f"many adapters: {a['requests']} requests at {a['rate']:g}/s, max_loras "
                 f"{a['max_loras']}, max_cpu_loras {a['max_cpu_loras']}, r{a['rank']}; warm p99 "
                 "in a cold burst / a warm one: "
                 f"{burst.get('warm_p99_cold_vs_warm_burst', float('nan')):.2f}x"
                 f"\n{a['shape']}; {_machine(data)}", fontsize=9)
    _save(fig, out)


def plot_chunked_prefill(data: dict, out: Path) -> None:
    """Per budget: the running requests' worst gap and the long prompt's TTFT (every repeat)."""
    c = data["config"]
    budgets = list(dict.fromkeys(r["budget"] for r in data["runs"]))
    labels = [f"{b} tokens" if b else "whole prompt" for b in budgets]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, title in ((axes[0], "running_worst_gap_ms",
                            "running requests' worst inter-token gap (ms)"),
                           (axes[1], "long_prompt_ttft_s", "long prompt's TTFT (s)")):
        for x, b in enumerate(budgets):
            ys = [r[key] for r in data["runs"] if r["budget"] == b]
            ax.plot([x] * len(ys), ys, "o", color="tab:blue")
        if key == "running_worst_gap_ms":
            decode = min(r["decode_step_ms"] for r in data["runs"])
            ax.axhline(decode, color="gray", ls="--", lw=1, label="a step with no prompt")
            ax.legend(fontsize=8)
        ax.set_xticks(range(len(budgets)), labels)
        ax.set_title(title, fontsize=9)
        ax.set_ylim(bottom=0)
    fig.suptitle(f"chunked prefill: a {c['prompt_len']}-token prompt arrives while "
                 f"{c['running']} requests decode\nLlama h{c['hidden']} x {c['layers']} "
                 f"layers, {c['dtype']}; {_machine(data)}", fontsize=9)
    _save(fig, out)


def plot_prefix_caching(data: dict, out: Path) -> None:
    """Prefix caching off / on: the batch's wall time and mean TTFT (every repeat)."""
    c = data["config"]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    for ax, key, title in ((axes[0], "seconds", "batch wall time (s)"),
                           (axes[1], "ttft_mean_s", "mean time to first token (s)")):
        for x, on in enumerate((False, True)):
            ys = [r[key] for r in data["runs"] if r["prefix_caching"] == on]
            ax.plot([x] * len(ys), ys, "o", color="tab:green" if on else "tab:gray")
        ax.set_xticks([0, 1], ["prefix caching off", "on"])
        ax.set_title(title, fontsize=9)
        ax.set_ylim(bottom=0)
    fig.suptitle(f"{c['requests']} requests over {c['adapters']} adapters: a shared "
                 f"{c['prefix_len']}-token prefix + {c['question_len']} tokens each, "
                 f"{c['new_tokens']} new\nLlama h{c['hidden']} x {c['layers']} layers, "
                 f"{c['dtype']}; {_machine(data)}", fontsize=9)
    _save(fig, out)


# (glob in benchmarks/results, plot function), most specific first; the PNG takes the
# JSON file's name.
PLOTS: list[tuple[str, Callable[[dict, Path], None]]] = [
    ("throughput_*.json", plot_throughput),
    ("decode_step_*.json", plot_decode_step),
    ("serve_many_adapters_*.json", plot_serve_many_adapters),
    ("serve_*.json", plot_serve),  # every other serve_ file
    ("many_adapters_*.json", plot_many_adapters),
    ("chunked_prefill_*.json", plot_chunked_prefill),
    ("prefix_caching_*.json", plot_prefix_caching),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    done: set[Path] = set()  # a file goes to the first pattern it matches
    for pattern, plot in PLOTS:
        files = sorted(set(a.results.glob(pattern)) - done)
        if not files:
            print(f"skip {pattern}: no such results yet")
        for path in files:
            plot(json.loads(path.read_text()), a.out / f"{path.stem}.png")
        done.update(files)


if __name__ == "__main__":
    main()
