"""Decode step of a mixture-of-experts model: the base, LoRA on the attention, LoRA on the
experts too.

Mixtral's layout at a small size (load_format="dummy": random weights; random PEFT
adapters saved per expert, transformers 4's layout). Modes, each sequence of the batch on
its own adapter except in `experts-one`:

    base            LoRA disabled
    attn-mixed      r16 on q/k/v/o
    experts-one     r16 on q/k/v/o and every expert's w1 / w2 / w3, one adapter for all
    experts-mixed   the same, a different adapter per sequence

    python benchmarks/moe_decode.py                      # the CPU shape, batch 1 8 32
    python benchmarks/moe_decode.py --hf                 # and transformers + PEFT
    python benchmarks/moe_decode.py --shape mixtral-16l --device cuda --hf   # a GPU, bf16
    python benchmarks/moe_decode.py --modes base attn-mixed --out old.json   # an A/B
    python benchmarks/moe_decode.py --shape gpt-oss-cpu --modes base attn-mixed --mxfp4

gpt-oss shapes (gpt-oss-*) run the base and attention LoRA (its expert LoRA is PEFT's
target_parameters, not written here); --mxfp4 gives them OpenAI's MXFP4 experts (kept
packed, dequantized per expert with tokens) instead of plain ones.

ms per decode step (median of the steps; best of --repeats rounds) to JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, make_tokenizer, write_json  # noqa: E402
from decode_step import (  # noqa: E402
    best_rounds,
    engine_decode_times,
    hf_decode_times,
    loraplex_commit,
    make_engine,
    measure,
)

SHAPES = {  # MixtralConfig fields
    "moe-cpu": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=8, intermediate_size=1024, num_local_experts=8,
                    num_experts_per_tok=2, vocab_size=32000, tie_word_embeddings=False,
                    sliding_window=None),
    # Mixtral 8x7B's shapes with 16 of its 32 layers: 47 GB in bf16, fits one H100
    "mixtral-16l": dict(hidden_size=4096, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, intermediate_size=14336, num_local_experts=8,
                        num_experts_per_tok=2, vocab_size=32000, tie_word_embeddings=False,
                        sliding_window=None, rope_theta=1e6),
}
# GptOssConfig fields: gpt-oss-20b's layout (24 layers, 32 experts, top 4, 64 query heads
# of 64 dims over 8 KV heads, alternating 128-token windows) at a CPU size, and with 12 of
# its 24 layers (its MXFP4 experts and bf16 rest: about 6 GB)
GPT_OSS_SHAPES = {
    "gpt-oss-cpu": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=2, head_dim=64, intermediate_size=512,
                        num_local_experts=16, num_experts_per_tok=4, vocab_size=32000,
                        sliding_window=128),
    "gpt-oss-20b-12l": dict(hidden_size=2880, num_hidden_layers=12, num_attention_heads=64,
                            num_key_value_heads=8, head_dim=64, intermediate_size=2880,
                            num_local_experts=32, num_experts_per_tok=4, vocab_size=201088,
                            sliding_window=128),
}
MODES = ("base", "attn-mixed", "experts-one", "experts-mixed")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERTS = ("w1", "w2", "w3")


def write_model_dir(out_dir: Path, shape: str, mxfp4: bool = False) -> Path:
    from transformers import GptOssConfig, MixtralConfig

    if shape in GPT_OSS_SHAPES:
        config = GptOssConfig(bos_token_id=1, eos_token_id=2, **GPT_OSS_SHAPES[shape])
        if mxfp4:
            config.quantization_config = {"quant_method": "mxfp4"}
    else:
        config = MixtralConfig(bos_token_id=1, eos_token_id=2, **SHAPES[shape])
    config.save_pretrained(out_dir)
    make_tokenizer(out_dir, config.vocab_size)
    return out_dir


def module_dims(shape: str, experts: bool) -> dict[str, tuple[int, int]]:
    """HF module name -> (in, out) of every targeted projection."""
    s = {**SHAPES, **GPT_OSS_SHAPES}[shape]
    h, i = s["hidden_size"], s["intermediate_size"]
    d = s.get("head_dim") or h // s["num_attention_heads"]
    q, kv = s["num_attention_heads"] * d, s["num_key_value_heads"] * d
    attn = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
    dims = {}
    for layer in range(s["num_hidden_layers"]):
        for t, d in attn.items():
            dims[f"model.layers.{layer}.self_attn.{t}"] = d
        if experts:
            for e in range(s["num_local_experts"]):
                for t in EXPERTS:
                    dims[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{t}"] = \
                        (i, h) if t == "w2" else (h, i)
    return dims


def write_adapters(out_dir: Path, shape: str, experts: bool, rank: int, count: int,
                   dtype: torch.dtype = torch.float32) -> list[Path]:
    from safetensors.torch import save_file

    dims = module_dims(shape, experts)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
              "lora_alpha": 2 * rank, "target_modules": list(ATTN + (EXPERTS if experts else ())),
              "lora_dropout": 0.0}
    paths = []
    for n in range(count):
        gen = torch.Generator().manual_seed(n)
        tensors = {}
        for name, (d_in, d_out) in dims.items():
            tensors[f"base_model.model.{name}.lora_A.weight"] = (0.02 * torch.randn(
                rank, d_in, generator=gen)).to(dtype)
            tensors[f"base_model.model.{name}.lora_B.weight"] = (0.02 * torch.randn(
                d_out, rank, generator=gen)).to(dtype)
        path = out_dir / f"{'experts' if experts else 'attn'}{n}"
        path.mkdir(parents=True)
        save_file(tensors, path / "adapter_model.safetensors")
        (path / "adapter_config.json").write_text(json.dumps(config))
        paths.append(path)
    return paths


def mode_loras(mode: str, batch: int, attn: list[Path], experts: list[Path]) -> list:
    from loraplex import LoRARequest

    if mode == "base":
        return [None] * batch
    paths = attn if mode == "attn-mixed" else experts
    offset = 0 if mode == "attn-mixed" else len(attn)  # distinct ids over both sets
    return [LoRARequest(f"a{offset + j}", offset + j + 1, str(paths[j]))
            for j in ([0] * batch if mode == "experts-one" else range(batch))]


def run_round(model_dir: Path, attn: list[Path], experts: list[Path],
              a: argparse.Namespace, bar: tqdm) -> list[dict]:
    records = []
    for lora in (False, True):
        modes = [m for m in a.modes if (m != "base") == lora]
        if not modes:
            continue
        engine = make_engine(model_dir, a, lora)
        for mode in modes:
            for batch in a.batch_sizes:
                decode = partial(engine_decode_times, engine,
                                 mode_loras(mode, batch, attn, experts), a.sync)
                records.append(measure("loraplex", mode, batch, decode, a, bar))
        del engine
        gc.collect()
    return records


def run_hf(model_dir: Path, attn: list[Path], experts: list[Path], a: argparse.Namespace,
           bar: tqdm) -> list[dict]:
    """The same modes in transformers + PEFT (random weights of the same shapes), one
    round of --hf-new-tokens steps: attn-mixed with PEFT's per-row `adapter_names`,
    experts-one with one adapter active (PEFT reads the per-expert files into its LoRA on
    transformers 5's fused experts). experts-mixed is left out: PEFT's LoRA on the fused
    experts refuses a mixed batch."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device(a.device):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir),
                                                 dtype=a.torch_dtype).eval()
    records = []
    for mode in [m for m in a.modes if m != "experts-mixed"]:
        names = None
        if mode == "attn-mixed":
            model = PeftModel.from_pretrained(model, attn[0], adapter_name="a0")
            for i, path in enumerate(attn[1:], start=1):
                model.load_adapter(path, adapter_name=f"a{i}")
        elif mode == "experts-one":
            model = model.get_base_model() if isinstance(model, PeftModel) else model
            model = PeftModel.from_pretrained(model, experts[0], adapter_name="e0")
        for batch in a.batch_sizes:
            names = [f"a{i}" for i in range(batch)] if mode == "attn-mixed" else None
            decode = partial(hf_decode_times, model, names, a.sync)
            records.append(measure("hf_peft", mode, batch, decode, a, bar, a.hf_new_tokens))
    return records


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted({**SHAPES, **GPT_OSS_SHAPES}), default="moe-cpu")
    ap.add_argument("--mxfp4", action="store_true",
                    help="gpt-oss shapes: MXFP4 experts, as OpenAI ships gpt-oss")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--hf", action="store_true",
                    help="also time transformers + PEFT on the same shapes")
    ap.add_argument("--hf-new-tokens", type=int, default=16)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if a.shape in GPT_OSS_SHAPES and any(m.startswith("experts") for m in a.modes):
        ap.error("gpt-oss shapes: --modes base attn-mixed (no expert adapters here)")
    if a.mxfp4 and (a.shape not in GPT_OSS_SHAPES or a.hf):
        ap.error("--mxfp4 goes with a gpt-oss shape, without --hf")
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = a.device.startswith("cuda")
    a.dtype = "bfloat16" if cuda else "float32"  # make_engine's (MoE: no CUDA graphs)
    a.torch_dtype, a.enforce_eager = getattr(torch, a.dtype), False
    a.sync = torch.cuda.synchronize if cuda else (lambda: None)
    return a


def main() -> None:
    a = parse_args()
    device = a.device.split(":")[0]
    out = a.out or Path(__file__).parent / "results" / f"moe_decode_{device}.json"
    load_before = os.getloadavg()[0]
    rounds = []
    with tempfile.TemporaryDirectory(prefix="lp-moe-") as tmp:
        model_dir = write_model_dir(Path(tmp) / "model", a.shape, a.mxfp4)
        count = max(a.batch_sizes)
        attn = write_adapters(Path(tmp), a.shape, False, a.rank, count, a.torch_dtype) \
            if "attn-mixed" in a.modes else []
        experts = write_adapters(Path(tmp), a.shape, True, a.rank, count, a.torch_dtype) \
            if any(m.startswith("experts") for m in a.modes) else []
        hf_cases = len([m for m in a.modes if m != "experts-mixed"]) if a.hf else 0
        total = (a.repeats * len(a.modes) + hf_cases) * len(a.batch_sizes)
        with tqdm(total=total, unit="case") as bar:
            for _ in range(a.repeats):
                rounds.append(run_round(model_dir, attn, experts, a, bar))
            hf_records = run_hf(model_dir, attn, experts, a, bar) if a.hf else []
    records = best_rounds(rounds) + hf_records
    for r in records:
        r["out_tok_s"] = r["batch"] / (r["ms_median"] / 1e3)
    write_json(out, {"benchmark": "moe_decode", "command": " ".join(sys.argv),
                     "config": {k: v for k, v in vars(a).items()
                                if k not in ("sync", "torch_dtype")}
                     | {"out": str(out),
                        "shape_config": {**SHAPES, **GPT_OSS_SHAPES}[a.shape]},
                     "machine": machine_info(), "loraplex_commit": loraplex_commit(),
                     "load_avg_1min": {"start": load_before, "end": os.getloadavg()[0]},
                     "results": records})
    for r in records:
        print(f"{r['engine']:8s} {r['mode']:14s} batch {r['batch']:3d}: "
              f"{r['ms_median']:8.1f} ms/step, "
              f"{r['out_tok_s']:.0f} tok/s")


if __name__ == "__main__":
    main()
