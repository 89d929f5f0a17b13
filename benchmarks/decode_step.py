"""Decode-step latency: milliseconds per `LLMEngine.step()` once every prompt is prefilled.

Three modes per batch size: `base` (LoRA disabled), `one` (every sequence the same
adapter), `mixed` (every sequence a different adapter, max_loras >= batch). Beside each
result: the weight-read floor, the time to read the base weights once at the measured copy
bandwidth, which no decode step can beat on a memory-bound device; and the floor with the
active adapters' and the KV cache's bytes added. Same script on the CPU and on CUDA; on
CUDA the engine replays decode CUDA graphs unless --enforce-eager, and each result says
how its decode steps ran (`cuda_graphs`: graph replays and eager decode steps).

On a CPU that other processes share, run it with OMP_WAIT_POLICY=PASSIVE: torch's OpenMP
threads otherwise spin-wait at every barrier, and when another process holds one of the
cores, every matmul waits for the thread that lost it (matmuls 12x slower, measured on 2
cores with other tests running).

The base model is `load_format="dummy"` (random weights of a preset's shapes: only
config.json and a tokenizer are written); the adapters are random PEFT directories.

    python benchmarks/decode_step.py                          # tiny-cpu shape, batch 1 8 32
    OMP_WAIT_POLICY=PASSIVE python benchmarks/decode_step.py --hf   # a CPU shared with others
    python benchmarks/decode_step.py --shape llama-3.1-8b --targets all-linear --hf   # a GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, make_tokenizer, write_json  # noqa: E402

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
# LlamaConfig fields. tiny-cpu is the CPU throughput benchmark's shape (throughput.py's
# defaults); the others are the real models' config.json numbers.
SHAPES: dict[str, dict] = {
    "tiny-cpu": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     num_key_value_heads=12, intermediate_size=2048, vocab_size=32000,
                     tie_word_embeddings=False),
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling=_LLAMA3_ROPE | {"factor": 32.0},
                         max_position_embeddings=131072),
    "llama-3.1-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                         tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling=_LLAMA3_ROPE | {"factor": 8.0},
                         max_position_embeddings=131072),
}
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
MODES = ("base", "one", "mixed")


# --quantization: what a typical 4-bit (or FP8) checkpoint's config.json says
QUANT_CONFIGS = {
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False,
             "sym": True, "checkpoint_format": "gptq"},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
            "version": "gemm"},
    "bnb-nf4": {"quant_method": "bitsandbytes", "load_in_4bit": True,
                "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    # Qwen3-FP8's: e4m3 weights, a scale per 128 x 128 block
    "fp8": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [128, 128]},
}


def write_model_dir(out_dir: Path, shape: str, quantization: str | None = None) -> Path:
    """config.json + tokenizer only: the engine builds random weights (load_format=dummy),
    packed 4-bit ones when the config says the checkpoint is quantized."""
    from transformers import LlamaConfig

    config = LlamaConfig(bos_token_id=1, eos_token_id=2, **SHAPES[shape])
    if quantization:
        config.quantization_config = QUANT_CONFIGS[quantization]
    config.save_pretrained(out_dir)
    make_tokenizer(out_dir, SHAPES[shape]["vocab_size"])
    return out_dir


def module_shapes(shape: str, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """HF module name -> (in_features, out_features) of every targeted projection."""
    s = SHAPES[shape]
    h, inter = s["hidden_size"], s["intermediate_size"]
    head_dim = h // s["num_attention_heads"]
    q, kv = s["num_attention_heads"] * head_dim, s["num_key_value_heads"] * head_dim
    dims = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    return {f"model.layers.{i}.{'self_attn' if t in ATTN else 'mlp'}.{t}": dims[t]
            for i in range(s["num_hidden_layers"]) for t in targets}


def write_adapters(out_dir: Path, shape: str, targets: tuple[str, ...], rank: int,
                   count: int, dora: bool = False) -> list[Path]:
    """`count` random PEFT LoRA directories (bf16 tensors, PEFT's key names and config);
    `dora`: DoRA adapters (use_dora, a magnitude vector per module)."""
    from safetensors.torch import save_file

    shapes = module_shapes(shape, targets)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
              "lora_alpha": 2 * rank, "target_modules": sorted(targets), "bias": "none",
              "lora_dropout": 0.0, "fan_in_fan_out": False, "inference_mode": True,
              "use_dora": dora}
    paths = []
    for i in tqdm(range(count), desc="writing adapters", unit="adapter"):
        gen = torch.Generator().manual_seed(i)
        tensors = {}
        for name, (n_in, n_out) in shapes.items():
            key = f"base_model.model.{name}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, n_in, generator=gen)
                                               * 0.02).to(torch.bfloat16)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(n_out, rank, generator=gen)
                                               * 0.02).to(torch.bfloat16)
            if dora:
                tensors[f"{key}.lora_magnitude_vector"] = torch.empty(n_out).uniform_(
                    0.5, 1.5, generator=gen).to(torch.bfloat16)
        path = out_dir / f"adapter{i}"
        path.mkdir(parents=True)
        save_file(tensors, path / "adapter_model.safetensors")
        (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
        paths.append(path)
    return paths


def copy_bandwidth_gb_s(device: torch.device, sync: Callable[[], None]) -> float:
    """Best of 5 copies of a 512 MiB tensor, counting the bytes read and written (STREAM's
    "copy" convention): what a memory-bound step can hope to stream through."""
    nbytes = 2**29
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def make_engine(model_dir: Path, a: argparse.Namespace, lora: bool):
    from loraplex import EngineArgs, LLMEngine

    batch = max(a.batch_sizes)
    return LLMEngine.from_engine_args(EngineArgs(
        model=str(model_dir), load_format="dummy", dtype=a.dtype, device=a.device,
        max_num_seqs=batch, max_model_len=a.prompt_len + a.new_tokens + 16,
        max_num_batched_tokens=max(8192, batch * a.prompt_len), enable_lora=lora,
        max_loras=batch, max_lora_rank=a.rank, max_cpu_loras=batch,
        enforce_eager=a.enforce_eager, kv_cache_dtype=a.kv_cache_dtype))


def graph_counters(engine) -> tuple[int, int]:
    """(CUDA graph replays, eager decode steps) so far."""
    runner = engine.model_runner
    graphs = runner.cuda_graphs
    return (graphs.num_replays if graphs is not None else 0), runner.num_eager_decode_steps


def engine_decode_times(engine, loras: list, sync: Callable[[], None],
                        prompts: list[list[int]], new_tokens: int) -> list[float]:
    """Seconds of each decode step of the whole batch. Steps until every request has its
    first token (the prefill; adapters may still be loading) are not timed, nor steps
    that advanced only part of the batch."""
    from loraplex import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for i, (ids, lora) in enumerate(zip(prompts, loras)):
        engine.add_request(f"r{i}", {"prompt_token_ids": ids}, params, lora_request=lora)
    started: set[str] = set()
    while len(started) < len(prompts):
        started.update(o.request_id for o in engine.step())
    sync()
    times = []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        advanced = len(engine.step())
        sync()
        if advanced == len(prompts):
            times.append(time.perf_counter() - t0)
    return times


def mode_loras(mode: str, batch: int, adapters: list[Path]) -> list:
    from loraplex import LoRARequest

    reqs = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(adapters)]
    return [None if mode == "base" else reqs[0] if mode == "one" else reqs[i]
            for i in range(batch)]


def run_loraplex(model_dir: Path, adapters: list[Path], a: argparse.Namespace,
                 sync: Callable[[], None], bar: tqdm) -> tuple[list[dict], int, torch.dtype]:
    """Timings of every (mode, batch); also the base weight bytes and the model dtype."""
    records = []
    for lora in (False, True):
        engine = make_engine(model_dir, a, lora)
        if not lora:
            weight_bytes = read_weight_bytes(engine.model, a.shape)
        for mode in (("one", "mixed") if lora else ("base",)):
            for batch in a.batch_sizes:
                decode = partial(engine_decode_times, engine,
                                 mode_loras(mode, batch, adapters), sync)
                before = graph_counters(engine)
                records.append(measure("loraplex", mode, batch, decode, a, bar))
                replays, eager = (n - m for n, m in zip(graph_counters(engine), before))
                graphs = engine.model_runner.cuda_graphs
                records[-1]["cuda_graphs"] = {
                    "replays": replays, "eager_decode_steps": eager,
                    "captured_sizes": graphs.sizes if graphs is not None else []}
        dtype = engine.model_config.dtype
        del engine
        gc.collect()
    return records, weight_bytes, dtype


def read_weight_bytes(model: torch.nn.Module, shape: str) -> int:
    """Bytes of the parameters a decode step reads (and a quantized layer's buffers, such
    as bitsandbytes' absmax): all but the embedding table, which is read whole only when
    it doubles as the LM head (tied)."""
    from loraplex.layers.quantization import QuantLinear

    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for m in model.modules()
                 if isinstance(m, QuantLinear) for b in m.buffers())
    if not SHAPES[shape]["tie_word_embeddings"]:
        embed = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding))
        total -= embed.weight.numel() * embed.weight.element_size()
    return total


def random_prompts(batch: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 1000, (batch, length), generator=gen).tolist()


def measure(engine: str, mode: str, batch: int,
            decode: Callable[[list[list[int]], int], list[float]], a: argparse.Namespace,
            bar: tqdm, new_tokens: int | None = None) -> dict:
    """One case: a warm-up on short prompts (loads the adapters into their slots, warms the
    kernels), then `decode` timed on the real prompts for `new_tokens` (default
    --new-tokens)."""
    new_tokens = new_tokens or a.new_tokens
    bar.set_postfix_str(f"{engine} {mode} batch {batch}")
    prompts = random_prompts(batch, a.prompt_len, seed=batch)
    decode([p[:8] for p in prompts], 3)
    times = decode(prompts, new_tokens)
    # (the warm-up may stagger: a sequence whose adapter is still loading starts late)
    if len(times) != new_tokens - 1:  # a sequence was preempted or prefilled late
        raise RuntimeError(f"{engine} {mode} batch {batch}: expected {new_tokens - 1} "
                           f"decode steps of the whole batch, timed {len(times)}")
    bar.update()
    return {"engine": engine, "mode": mode, "batch": batch, "steps": len(times),
            "ms_median": 1e3 * statistics.median(times),
            "ms_mean": 1e3 * statistics.fmean(times), "ms_min": 1e3 * min(times)}


def best_rounds(rounds: list[list[dict]]) -> list[dict]:
    """Per case, the round with the lowest median step (timeit's rule: other processes only
    ever add time), with every round's median beside it."""
    best = []
    for case in zip(*rounds):
        record = dict(min(case, key=lambda r: r["ms_median"]))
        record["round_medians_ms"] = [r["ms_median"] for r in case]
        best.append(record)
    return best


def hf_decode_times(model, names: list[str] | None, sync: Callable[[], None],
                    prompts: list[list[int]], new_tokens: int) -> list[float]:
    """HF's own decode loop (greedy, DynamicCache), timed per step like the engine's."""
    device = next(model.parameters()).device
    kw = {"adapter_names": names} if names else {}
    times = []
    with torch.inference_mode():
        out = model(input_ids=torch.tensor(prompts, device=device), use_cache=True,
                    logits_to_keep=1, **kw)
        for _ in range(new_tokens - 1):
            nxt = out.logits[:, -1:].argmax(-1)
            sync()
            t0 = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True,
                        **kw)
            nxt = out.logits[:, -1:].argmax(-1)
            sync()
            times.append(time.perf_counter() - t0)
    return times


def run_hf(model_dir: Path, adapters: list[Path], a: argparse.Namespace, dtype: torch.dtype,
           sync: Callable[[], None], bar: tqdm) -> list[dict]:
    """The same cases in transformers + PEFT (random weights of the same shapes): `one`
    activates a single adapter, `mixed` uses PEFT's per-row `adapter_names`. One round of
    --hf-new-tokens steps: HF + PEFT mixed is ~100x slower than loraplex (854 ms/step at
    8B batch 32 on an H100), and its step time is steady enough for that."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device(a.device):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir),
                                                 dtype=dtype).eval()
    records = []
    for mode in MODES:
        if mode == "one":
            model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
            for i, path in enumerate(adapters[1:], start=1):
                model.load_adapter(path, adapter_name=f"a{i}")
        for batch in a.batch_sizes:
            names = [f"a{i}" for i in range(batch)] if mode == "mixed" else None
            decode = partial(hf_decode_times, model, names, sync)
            records.append(measure("hf_peft", mode, batch, decode, a, bar, a.hf_new_tokens))
    return records


def add_floors(records: list[dict], a: argparse.Namespace, weight_bytes: int,
               elem: int, gb_s: float) -> None:
    """Per record: the bytes one decode step must read at least (weights, the active
    adapters, the KV cache at the mean context) and that floor in ms at `gb_s`."""
    s = SHAPES[a.shape]
    adapter_bytes = elem * a.rank * sum(i + o for i, o in
                                        module_shapes(a.shape, a.targets).values())
    kv_per_token = (2 * s["num_hidden_layers"] * s["num_key_value_heads"] * elem
                    * s["hidden_size"] // s["num_attention_heads"])
    for r in records:
        active = {"base": 0, "one": 1, "mixed": r["batch"]}[r["mode"]]
        kv = r["batch"] * (a.prompt_len + a.new_tokens // 2) * kv_per_token
        r["bytes_read_floor"] = weight_bytes + active * adapter_bytes + kv
        r["floor_ms"] = r["bytes_read_floor"] / gb_s / 1e6
        r["vs_floor"] = r["ms_median"] / r["floor_ms"]
        r["out_tok_s"] = r["batch"] * 1e3 / r["ms_median"]


def loraplex_commit() -> str | None:
    """The commit of the loraplex being measured (None outside a git checkout)."""
    import loraplex

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(loraplex.__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny-cpu")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3,
                    help="rounds over every case; per case, the round with the lowest "
                         "median step counts")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="attn", choices=["attn", "all-linear"],
                    help="attn: q/k/v/o_proj; all-linear: also gate/up/down_proj")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    ap.add_argument("--dtype", default="auto", help="auto: fp32 on the CPU, bf16 on CUDA")
    ap.add_argument("--kv-cache-dtype", default="auto",
                    choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"],
                    help="the engine's KV cache storage (vLLM's flag)")
    ap.add_argument("--enforce-eager", action="store_true",
                    help="no CUDA graphs for decode (they are on by default on CUDA)")
    ap.add_argument("--quantization", choices=sorted(QUANT_CONFIGS), default=None,
                    help="a 4-bit base of the shape (dummy packed weights): GPTQ / AWQ "
                         "in groups of 128, bitsandbytes NF4 in blocks of 64")
    ap.add_argument("--dora", action="store_true",
                    help="DoRA adapters (use_dora: a magnitude vector per module)")
    ap.add_argument("--hf", action="store_true",
                    help="also time transformers + PEFT on the same shapes (slow: one round)")
    ap.add_argument("--hf-new-tokens", type=int, default=16,
                    help="tokens per HF case (its decode steps are timed the same way)")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: benchmarks/results/decode_step_<device>.json")
    a = ap.parse_args()
    if min(a.new_tokens, a.hf_new_tokens) < 2:
        ap.error("--new-tokens and --hf-new-tokens must be >= 2 (the first token comes from "
                 "the prefill)")
    if a.repeats < 1:
        ap.error("--repeats must be >= 1")
    if a.quantization and a.hf:
        ap.error("--hf runs an unquantized base: leave it out with --quantization")
    a.targets = ATTN if a.targets == "attn" else ATTN + MLP
    a.device = "cuda" if a.device == "auto" and torch.cuda.is_available() else (
        "cpu" if a.device == "auto" else a.device)
    return a


def main() -> None:
    a = parse_args()
    device = torch.device(a.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = a.out or Path(__file__).parent / "results" / f"decode_step_{device.type}.json"
    load_before = os.getloadavg()[0]
    rounds, bandwidths, hf_records = [], [], []
    with tempfile.TemporaryDirectory(prefix="lp-decode-") as tmp:
        model_dir = write_model_dir(Path(tmp) / "model", a.shape, a.quantization)
        adapters = write_adapters(Path(tmp), a.shape, a.targets, a.rank, max(a.batch_sizes),
                                  a.dora)
        cases = len(MODES) * len(a.batch_sizes) * (a.repeats + (1 if a.hf else 0))
        with tqdm(total=cases, desc="decode cases", unit="case") as bar:
            for _ in range(a.repeats):  # whole rounds: a burst of load spoils one round
                bandwidths.append(copy_bandwidth_gb_s(device, sync))
                records, weight_bytes, dtype = run_loraplex(model_dir, adapters, a, sync, bar)
                rounds.append(records)
                # written after every round: a run cut short by a time limit keeps them
                write_results(out, a, rounds, hf_records, bandwidths, weight_bytes, dtype,
                              load_before, complete=False)
            if a.hf:
                hf_records = run_hf(model_dir, adapters, a, dtype, sync, bar)
    records = write_results(out, a, rounds, hf_records, bandwidths, weight_bytes, dtype,
                            load_before, complete=True)
    gb_s = max(bandwidths)
    weight_floor_ms = weight_bytes / gb_s / 1e6
    print(f"copy bandwidth on {device}: {gb_s:.1f} GB/s (best of {a.repeats} rounds)")
    print(f"weights read per step: {weight_bytes / 1e9:.3f} GB -> floor {weight_floor_ms:.1f} ms")
    for r in records:
        graphs = r.get("cuda_graphs")
        how = "" if graphs is None else (
            " [graphs]" if graphs["replays"] and not graphs["eager_decode_steps"] else
            " [eager]" if not graphs["replays"] else " [graphs+eager]")
        print(f"{r['engine']:8s} {r['mode']:5s} batch {r['batch']:3d}: {r['ms_median']:8.1f} "
              f"ms/step (floor {r['floor_ms']:.1f} ms, x{r['vs_floor']:.2f}), "
              f"{r['out_tok_s']:.0f} tok/s{how}")


def write_results(out: Path, a: argparse.Namespace, rounds: list[list[dict]],
                  hf_records: list[dict], bandwidths: list[float], weight_bytes: int,
                  dtype: torch.dtype, load_before: float, complete: bool) -> list[dict]:
    """The JSON so far: per loraplex case its best round, the HF cases, the floors."""
    records = best_rounds(rounds) + [dict(r) for r in hf_records]
    gb_s = max(bandwidths)
    elem = torch.empty((), dtype=dtype).element_size()
    add_floors(records, a, weight_bytes, elem, gb_s)
    config = vars(a) | {"targets": list(a.targets), "out": str(out), "shape_config":
                        SHAPES[a.shape], "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}
    write_json(out, {"benchmark": "decode_step", "command": " ".join(sys.argv),
                     "complete": complete, "rounds_done": len(rounds),
                     "config": config, "machine": machine_info(),
                     "loraplex_commit": loraplex_commit(), "device": torch.device(a.device).type,
                     # other processes on the machine skew timings: the 1-min load average
                     "load_avg_1min": {"start": load_before, "end": os.getloadavg()[0]},
                     "dtype": str(dtype).removeprefix("torch."), "copy_bandwidth_gb_s": gb_s,
                     "copy_bandwidth_rounds_gb_s": bandwidths,
                     "weight_bytes": weight_bytes, "weight_floor_ms": weight_bytes / gb_s / 1e6,
                     "cuda_graphs_used": any(r.get("cuda_graphs", {}).get("replays")
                                             for r in records),
                     "results": records})
    return records


if __name__ == "__main__":
    main()
