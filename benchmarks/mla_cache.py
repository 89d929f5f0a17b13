"""DeepSeek's multi-head latent attention: what its KV cache holds, prefill and decode time.

A DeepSeek-V2-Lite-shaped model (its attention, experts and vocabulary; `--layers` of its
27 layers, the first dense as in V2-Lite, or all dense: `--dense`), random weights (load_format="dummy"), fp32 on
the CPU. One engine with a fixed KV cache budget (`--kv-cache-mib`):

    kv_tokens       tokens the cache holds (its blocks x block size)
    prefill_s       seconds until every one of `--prompts` prompts of `--prompt-len` tokens
                    has its first token (whole prompts in one step each)
    decode_ms       ms per decode step of that batch after it (median of `--new-tokens`)

Run it on two commits for an A/B (the cache's layout is the code's, not an option):

    OMP_WAIT_POLICY=PASSIVE python benchmarks/mla_cache.py --out benchmarks/results/mla.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, make_tokenizer, write_json  # noqa: E402
from decode_step import loraplex_commit  # noqa: E402

# DeepSeek-V2-Lite's config.json numbers
V2_LITE = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=16,
               kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64,
               v_head_dim=128, intermediate_size=10944, moe_intermediate_size=1408,
               n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
               first_k_dense_replace=1, topk_method="greedy", norm_topk_prob=False,
               routed_scaling_factor=1.0, vocab_size=102400, max_position_embeddings=4096,
               rope_theta=10000.0, tie_word_embeddings=False)


def write_model(out: Path, layers: int, dense: bool) -> Path:
    from transformers import DeepseekV2Config

    shape = V2_LITE | ({"first_k_dense_replace": layers} if dense else {})
    DeepseekV2Config(bos_token_id=1, eos_token_id=2, num_hidden_layers=layers,
                     **shape).save_pretrained(out)
    make_tokenizer(out, V2_LITE["vocab_size"])
    return out


def run(model: Path, a: argparse.Namespace) -> dict:
    from loraplex import EngineArgs, LLMEngine, SamplingParams

    engine = LLMEngine.from_engine_args(EngineArgs(
        model=str(model), load_format="dummy", dtype="float32", device="cpu",
        max_num_seqs=a.max_num_seqs, max_model_len=a.prompt_len + a.new_tokens + 16,
        max_num_batched_tokens=a.prompt_len, kv_cache_memory_bytes=a.kv_cache_mib << 20))
    kv_tokens = engine.model_runner.num_blocks * engine.config.cache_config.block_size
    params = SamplingParams(temperature=0.0, max_tokens=a.new_tokens, ignore_eos=True)
    for i in range(a.prompts):
        ids = [(97 * i + 13 * j) % 100000 + 3 for j in range(a.prompt_len)]
        engine.add_request(f"r{i}", {"prompt_token_ids": ids}, params)
    started: set[str] = set()
    t0 = time.perf_counter()
    while len(started) < a.prompts:
        started.update(o.request_id for o in engine.step())
    prefill_s = time.perf_counter() - t0
    steps = []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        advanced = len(engine.step())
        if advanced == a.prompts:
            steps.append(time.perf_counter() - t0)
    return {"kv_tokens": kv_tokens, "prefill_s": prefill_s,
            "decode_ms": statistics.median(steps) * 1e3, "decode_steps": len(steps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=1001)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--kv-cache-mib", type=int, default=256)
    # room for more sequences than run, so the cache is the budget's size, not theirs
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--dense", action="store_true",
                    help="every layer dense (no experts): the attention's share is larger")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/mla_cache_cpu.json"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(write_model(Path(tmp), a.layers, a.dense), a)
    print(f"KV cache {a.kv_cache_mib} MiB: {result['kv_tokens']} tokens; prefill "
          f"{a.prompts} x {a.prompt_len}: {result['prefill_s']:.2f} s; decode "
          f"{result['decode_ms']:.1f} ms/step")
    write_json(a.out, {"benchmark": "mla_cache", "command": " ".join(sys.argv),
                       "config": {k: (str(v) if isinstance(v, Path) else v)
                                  for k, v in vars(a).items()},
                       "machine": machine_info(), "loraplex_commit": loraplex_commit(),
                       **result})


if __name__ == "__main__":
    main()
