"""Mixture-of-experts GGUF files (qwen2moe, qwen3moe, minimax-m2) as bases, with PEFT adapters on top.

The files are written as llama.cpp's converter writes them (tests/gguf_fixtures.py: the
experts stacked per layer into ffn_{gate,up,down}_exps, the router ffn_gate_inp in F32,
Qwen2-MoE's shared expert and its gate, MiniMax-M2's router bias exp_probs_b); the reference is transformers' GGUF reading +
PEFT, fp32. transformers 5 reads no expert_feed_forward_length (nor Qwen2-MoE's
expert_shared_feed_forward_length): its configs get their defaults, the sizes of one
released model. loraplex reads them; the reference gets them by adding the two keys to
transformers' own GGUF key map while it is built (`hf_reads_expert_sizes`), since the
tiny models' sizes are not those defaults.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import transformers

from loraplex import LoRARequest
from loraplex.layers.quantized_experts import PackedIntFusedExperts
from tests.engine_utils import GREEDY, check_against_hf, make_llm
from tests.fixtures import make_peft_adapter, make_tiny_model

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5,
                                reason="MoE GGUF files need transformers 5 (refused on 4.x)")

from tests.gguf_fixtures import write_gguf  # noqa: E402 (needs gguf)

# HF model_type -> the tiny model's options: every layer a mixture (llama.cpp has no
# mlp_only_layers), sizes whole Q8_0 / Q4_0 blocks of 32; Qwen3-MoE's top-k weights
# renormalized (what transformers' GGUF config sets for it, as llama.cpp computes)
MODELS = {
    "qwen2_moe": dict(moe_intermediate_size=64, shared_expert_intermediate_size=96, seed=81),
    "qwen3_moe": dict(moe_intermediate_size=64, mlp_only_layers=[], norm_topk_prob=True,
                      seed=82),
    # 8 experts of 48 (tests/fixtures.py): sigmoid routing with a correction bias
    "minimax_m2": dict(seed=86),
}
# model_type -> (its MoE block's name, experts, their intermediate size)
MOE = {"qwen2_moe": ("mlp", 4, 64), "qwen3_moe": ("mlp", 4, 64),
       "minimax_m2": ("block_sparse_moe", 8, 48)}
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]  # PEFT's target_parameters (5.x)
ADAPTERS = {
    "r4_qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=83),
    # the experts with their own rank and alpha, beside attention
    "r8_experts": dict(r=8, lora_alpha=16, target_modules=["o_proj"], seed=84,
                       target_parameters=EXPERTS, rank_pattern={"gate_up_proj": 4},
                       alpha_pattern={"down_proj": 30}),
    # every linear: the router, Qwen2-MoE's shared expert and its gate too
    "r16_all": dict(r=16, lora_alpha=16, target_modules="all-linear", seed=85, scale=0.2),
}
# MiniMax-M2's HF router is no Linear: all-linear puts a LoRA on its parameter, which
# loraplex refuses (test_more_architectures.py); attention and the experts instead
MINIMAX_ADAPTERS = {"r4_qv": ADAPTERS["r4_qv"], "r8_experts": ADAPTERS["r8_experts"],
                    "r16_attn": dict(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj",
                                                                          "v_proj", "o_proj"],
                                     seed=87)}
CASES = [("qwen2_moe", "Q8_0"), ("qwen3_moe", "Q4_0"), ("qwen3_moe", "F16"),
         ("minimax_m2", "Q8_0")]


@contextmanager
def hf_reads_expert_sizes():
    """The two keys transformers' GGUF config map lacks, added for the reference only
    (loraplex reads them itself)."""
    from transformers.integrations import ggml

    with pytest.MonkeyPatch.context() as mp:
        for model_type, keys in (("qwen2_moe", ("moe", "shared_expert")),
                                 ("qwen3_moe", ("moe",))):
            mapping = dict(ggml.GGUF_CONFIG_MAPPING[model_type])
            mapping["expert_feed_forward_length"] = "moe_intermediate_size"
            if "shared_expert" in keys:
                mapping["expert_shared_feed_forward_length"] = "shared_expert_intermediate_size"
            mp.setitem(ggml.GGUF_CONFIG_MAPPING, model_type, mapping)
        yield


class MoEModels:
    """model_type -> (HF dir, its adapters), built when first asked for."""

    def __init__(self, root: Path) -> None:
        self.root, self.built = root, {}

    def __getitem__(self, arch: str) -> tuple[Path, dict[str, Path]]:
        if arch not in self.built:
            base = make_tiny_model(self.root / arch, arch, **MODELS[arch])
            self.built[arch] = (base, {n: make_peft_adapter(base, self.root / f"{arch}-{n}",
                                                            **spec)
                                       for n, spec in (MINIMAX_ADAPTERS if arch == "minimax_m2"
                                                       else ADAPTERS).items()})
        return self.built[arch]


@pytest.fixture(scope="module")
def moe_models(tiny_root: Path) -> MoEModels:
    return MoEModels(tiny_root / "gguf-moe")


def moe_gguf(models: MoEModels, arch: str, quant: str) -> Path:
    folder = models.root / f"{arch}-{quant}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{arch}-{quant}.gguf"
    return path if path.exists() else write_gguf(models[arch][0], path, quant)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c))
def test_moe_gguf_with_mixed_adapters_matches_hf_peft(case, moe_models, prompts):
    """The base and adapters on attention, on the experts (rank and alpha patterns) and on
    every linear, in one batch over the file: each as HF's GGUF model + PEFT."""
    arch, quant = case
    path, (hf_dir, ad) = moe_gguf(moe_models, arch, quant), moe_models[arch]
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    assert "blk.0.ffn_gate_exps.weight" in names and "blk.1.ffn_down_exps.weight" in names
    assert ("blk.0.ffn_gate_inp_shexp.weight" in names) == (arch == "qwen2_moe")
    llm = make_llm(path, tokenizer=str(hf_dir), enable_lora=True, max_loras=3,
                   max_lora_rank=32)
    block, e, i = MOE[arch]
    experts = getattr(llm.llm_engine.model.model.layers[1], block).experts.base_layer
    # MiniMax-M2's down_exps rows (48 inputs) are no whole number of blocks: F16, as
    # llama.cpp falls back, so its layers' experts are dequantized whole
    if quant == "F16" or arch == "minimax_m2":  # dequantized, stacked [E, out, in]
        assert experts.w13.shape == (e, 2 * i, 64) and experts.w2.shape == (e, 64, i)
    else:  # kept in GPTQ's layout: [E, in / per, out] int32 words
        per = 32 // {"Q8_0": 8, "Q4_0": 4}[quant]
        assert isinstance(experts, PackedIntFusedExperts) and experts.cfg.bits == 32 // per
        assert experts.w13.shape == (e, 64 // per, 2 * i) and experts.w2.shape == (e, i // per,
                                                                                  64)
    reqs = [None, *(LoRARequest(n, i + 1, str(ad[n])) for i, n in enumerate(sorted(ad)))]
    jobs = [(p, r) for i, p in enumerate(prompts[:4]) for r in reqs[i % 2:][:3]]
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in jobs], GREEDY,
                        lora_request=[r for _, r in jobs])
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    if arch != "minimax_m2":  # transformers' default: not the file's
        assert hf_config.moe_intermediate_size != 64
    with hf_reads_expert_sizes():
        check_against_hf(outs, path, [ad[r.lora_name] if r else None for _, r in jobs],
                         [p for p, _ in jobs], atol=3e-4)


def test_a_llama_file_with_experts_is_refused(tmp_path):
    """Mixtral as llama.cpp writes it ("llama" with stacked experts): transformers reads a
    dense Llama config from it, so it is refused at start-up, by name."""
    writer = gguf.GGUFWriter(str(tmp_path / "mixtral.gguf"), "llama")
    writer.add_block_count(1)
    writer.add_tensor("blk.0.ffn_gate_exps.weight", np.zeros((4, 64, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="Mixtral as llama.cpp writes it"):
        make_llm(tmp_path / "mixtral.gguf")
