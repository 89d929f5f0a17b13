"""Qwen3-VL-MoE (Qwen3VLMoeForConditionalGeneration) with images, against HF transformers
(+ PEFT) on the same weights, fp32: a tiny one (Qwen3-VL's tower with DeepStack over a
Qwen3-MoE language model, 4 experts top-2 and a dense layer, `mlp_only_layers`) in both of
its checkpoints' expert layouts (transformers 5's save, [E, 2I, H], and the hub's,
transposed [E, H, 2I]); greedy tokens HF's and logprobs within 1e-4 for a mixed batch
(image and text prompts, the base and two adapters of different ranks over one slot: one
on the attention and the dense layer's MLP, one with PEFT's target_parameters LoRA on the
fused experts and the router), whole and chunked prefill; the router's config flags; the
server's chat route under the experts adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from loraplex import LoRARequest
from loraplex.models.moe_flags import moe_flags
from tests.engine_utils import make_llm
from tests.llava_fixtures import data_url, image
from tests.multimodal_fixtures import (
    LANGUAGE_MODEL,
    chat_token_ids,
    greedy_reference,
    load_multimodal,
    make_multimodal_adapter,
    request,
)
from tests.qwen2_vl_fixtures import (
    ASK,
    GREEDY,
    IMAGE,
    check,
    hf_inputs,
    hf_logprobs,
    make_tiny_qwen3_vl,
)
from tests.server_utils import RemoteServer
from tests.test_qwen2_vl import TEXT, TWO

pytest.importorskip("PIL")
pytest.importorskip("transformers.models.qwen3_vl_moe")
pytest.importorskip("peft")
if int(transformers.__version__.split(".")[0]) < 5:  # 4.57 keeps the experts transposed
    pytest.skip("the adapters' target_parameters LoRA is transformers 5's layout",
                allow_module_level=True)


# PEFT's LoRA on the experts' fused parameters and on the router's weight (HF's router is
# no nn.Linear on transformers 5: target_parameters, saved as a module's LoRA on `gate`)
ROUTER_AND_EXPERTS = ["experts.gate_up_proj", "experts.down_proj", "mlp.gate.weight"]


def _hub_layout(base: Path, out: Path) -> Path:
    """A copy of `base` with its experts as the hub's files store them (gate_up_proj
    [E, H, 2I], down_proj [E, I, H]), which transformers 5 transposes as it loads."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, out)
    for f in out.glob("*.safetensors"):
        tensors = load_file(str(f))
        for name in list(tensors):
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                tensors[name] = tensors[name].transpose(1, 2).contiguous()
        save_file(tensors, str(f), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def moe(tiny_root):
    root = tiny_root / "qwen3vlmoe"
    base = make_tiny_qwen3_vl(root / "base", seed=90, moe=True)
    return {"base": base, "hub": _hub_layout(base, root / "hub"),
            "r8": make_multimodal_adapter(
                base, root / "r8", r=8, seed=91,
                targets=LANGUAGE_MODEL + "(q_proj|v_proj|o_proj|gate_proj)"),
            "r6": make_multimodal_adapter(base, root / "r6", r=6, seed=92,
                                          targets=LANGUAGE_MODEL + "k_proj",
                                          target_parameters=ROUTER_AND_EXPERTS)}


def test_checkpoint_layouts(moe):
    """transformers 5 saves the experts untransposed, the hub's files hold them
    transposed, and HF loads both to the same weights (the fixture's two layouts)."""
    from safetensors import safe_open

    shapes = {}
    for layout in ("base", "hub"):
        with safe_open(str(next(moe[layout].glob("*.safetensors"))), "pt") as f:
            shapes[layout] = [f.get_slice(f"model.language_model.layers.0.mlp.experts.{p}")
                              .get_shape() for p in ("gate_up_proj", "down_proj")]
    assert shapes == {"base": [[4, 96, 64], [4, 64, 48]], "hub": [[4, 64, 96], [4, 48, 64]]}
    ours, hub = (load_multimodal(moe[k]).state_dict() for k in ("base", "hub"))
    assert all(torch.equal(ours[k], hub[k]) for k in ours)
    config = json.loads((moe["r6"] / "adapter_config.json").read_text())
    assert config["target_parameters"] == ROUTER_AND_EXPERTS


@pytest.mark.parametrize("layout", ["base", "hub"])
@pytest.mark.parametrize("budget", [None, 16])
def test_mixed_batch_matches_hf(layout, budget, moe):
    """Image requests (one image, two of different sizes) and text ones under the base,
    the attention and dense-MLP adapter (r8) and the experts and router adapter (r6, one A for gate
    and up per expert), one slot; budget 16: chunked prefill through the images."""
    base = moe["base"]
    llm = make_llm(moe[layout], enable_lora=True, max_loras=1, max_lora_rank=8,
                   max_num_batched_tokens=budget)
    a, b = image(1, (52, 40)), image(2, (24, 40))
    jobs = [(ASK, [a], None), (ASK, [a], "r8"), (ASK, [a], "r6"), (ASK, [b], "r6"),
            (TEXT, [], "r6"), (TEXT, [], "r8"), (TEXT, [], None), (TWO, [a, b], None),
            (TWO, [b, a], "r6")]
    loras = {"r8": LoRARequest("r8", 1, str(moe["r8"])),
             "r6": LoRARequest("r6", 2, str(moe["r6"]))}
    outs = llm.generate([request(p, ims) for p, ims, _ in jobs], GREEDY, use_tqdm=False,
                        lora_request=[loras[n] if n else None for *_, n in jobs])
    check(outs, base, [(p, ims, moe[n] if n else None) for p, ims, n in jobs])
    assert len({tuple(o.outputs[0].token_ids) for o in outs[:3]}) == 3


def test_router_and_sparse_layers_from_config():
    """HF's router renormalizes the top-k whatever the config says (Qwen3-VL-MoE's has no
    norm_topk_prob); the dense layers are mlp_only_layers' and those off
    decoder_sparse_step; the experts load fused; a quantized one is refused."""
    from transformers import Qwen3VLMoeConfig

    from loraplex.layers.quantization.config import QuantConfig

    text = Qwen3VLMoeConfig(text_config=dict(num_hidden_layers=6, decoder_sparse_step=2,
                                             mlp_only_layers=[3], num_experts=4,
                                             num_experts_per_tok=2)).text_config
    flags = moe_flags(text, "Qwen3MoeForCausalLM", None)
    assert flags["norm_topk_prob"] and flags["fused_experts"]
    assert flags["dense_layers"] == (0, 2, 3, 4)
    with pytest.raises(ValueError, match="quantized Qwen3-VL-MoE"):
        moe_flags(text, "Qwen3MoeForCausalLM", QuantConfig("fp8", 8, -1))


def test_server_chat_with_image_under_the_experts_adapter(moe):
    """The server's chat route with a data-URL image under the experts and router
    adapter (`--lora-modules`): HF + PEFT's greedy tokens."""
    base = moe["base"]
    a = image(1, (52, 40))
    content = [{"type": "image_url", "image_url": {"url": data_url(a)}},
               {"type": "text", "text": "What is this?"}]
    inp = hf_inputs(base, f"<|im_start|>user\n{IMAGE}What is this?<|im_end|>\n"
                          "<|im_start|>assistant\n", [a], add_special_tokens=False)
    want = greedy_reference(lambda reply: hf_logprobs(base, moe["r6"], inp, reply),
                            GREEDY.max_tokens)
    with RemoteServer(moe["hub"], ["--max-model-len", "256", "--dtype", "float32",
                                   "--enable-lora", "--max-lora-rank", "8",
                                   "--lora-modules", f"r6={moe['r6']}"]) as server:
        assert chat_token_ids(server.get_client(), "r6", content) == want
