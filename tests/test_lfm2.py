"""LFM2 and LFM2-MoE (models/lfm2.py, layers/short_conv.py) against HF transformers + PEFT
(fp32).

Tiny random models, hidden 64, 4 attention heads over 2 KV heads, convolutions of 3 taps:
- LFM2: layers conv, attention, conv, conv; intermediate_size 100 with
  block_auto_adjust_ff_dim (x 2/3, x 1.5, up to a multiple of 32: an MLP of 128), tied
  embeddings.
- LFM2-MoE: conv, attention, conv with biases on the conv blocks; the first layer a dense
  MLP of 96, the others 8 experts of 24, 2 per token, sigmoid-routed with an expert bias
  that changes the choice, renormalized, times 1.5.
Adapters of ranks 4 (the conv blocks' in_proj / out_proj and attention's q / v) and 8
(every linear; LFM2-MoE's experts too, PEFT's target_parameters), in one batch with the
base, prompts prefilled in chunks of 7 beside other sequences' decodes; preemption; an
adapter of too high a rank refused alone, in the engine and over HTTP. LFM2-MoE also with
its experts fused (transformers 5's in-memory layout), without expert_bias and
renormalization, and its routing weights against HF's router to fp32 rounding. LFM2-VL
(the LFM2 above behind a tiny SigLIP2 tower) on text against HF + PEFT on the VL model,
its images refused offline and over HTTP (saved without preprocessor_config.json: served
on text; its images: tests/test_lfm2_vl_images.py).
"""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from loraplex import LoRARequest, SamplingParams
from loraplex.layers.moe import GroupedTopKRouter
from loraplex.layers.short_conv import ShortConv
from loraplex.models.lfm2 import ff_size, lfm2_flags
from loraplex.worker.mamba_state import state_bytes_per_slot
from tests.engine_utils import (
    GREEDY,
    check_against_hf,
    check_mixed_batch,
    lora_requests,
    make_llm,
)
from tests.fixtures import _reinit_, make_peft_adapter, make_tokenizer
from tests.handmade_lora import (
    fused_experts_checkpoint,
    merged_checkpoint,
    write_lora_adapter,
)
from tests.server_utils import RemoteServer, check_rank_refused, token_ids_of
from tests.test_hybrid import check_preemption

HIDDEN, EXPERTS, EXPERT_SIZE = 64, 8, 24
COMMON = dict(hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, conv_L_cache=3, bos_token_id=1, eos_token_id=2,
              pad_token_id=3, tie_word_embeddings=True)


def lfm2_config(vocab_size: int):
    return transformers.Lfm2Config(
        vocab_size=vocab_size, **COMMON, num_hidden_layers=4, intermediate_size=100,
        layer_types=["conv", "full_attention", "conv", "conv"], block_auto_adjust_ff_dim=True,
        block_ffn_dim_multiplier=1.5, block_multiple_of=32)


def lfm2_moe_config(vocab_size: int):
    return transformers.Lfm2MoeConfig(
        vocab_size=vocab_size, **COMMON, num_hidden_layers=3, intermediate_size=96,
        layer_types=["conv", "full_attention", "conv"], conv_bias=True, num_dense_layers=1,
        num_experts=EXPERTS, num_experts_per_tok=2, moe_intermediate_size=EXPERT_SIZE,
        routed_scaling_factor=1.5, norm_topk_prob=True, use_expert_bias=True)


CONFIGS = {"lfm2": lfm2_config, "lfm2_moe": lfm2_moe_config}
CONV = ["in_proj", "out_proj", "q_proj", "v_proj"]
EXPERT_PARAMETERS = {"lfm2_moe": ["feed_forward.experts.gate_up_proj",
                                  "feed_forward.experts.down_proj"]}


def _skip_reason(kind: str) -> str | None:
    name = "Lfm2Config" if kind == "lfm2" else "Lfm2MoeConfig"
    if not hasattr(transformers, name):
        return f"transformers {transformers.__version__} has no {name}"
    return None


def make_model(out: Path, kind: str, seed: int, **overrides) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    torch.manual_seed(seed)
    config = CONFIGS[kind](len(tok))
    for key, value in overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _reinit_(model, seed, 0.2)
    gen = torch.Generator().manual_seed(seed + 5)
    with torch.no_grad():  # an expert bias that changes the choice
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))
    model.eval().save_pretrained(str(out))
    return out


@pytest.fixture(scope="module", params=list(CONFIGS))
def lfm2(request, tiny_root: Path) -> tuple[str, Path, dict[str, Path]]:
    kind = request.param
    if (reason := _skip_reason(kind)) is not None:
        pytest.skip(reason)
    seed = 170 + 10 * list(CONFIGS).index(kind)
    root = tiny_root / f"lfm2_{kind}"
    base = make_model(root / "base", kind, seed)
    specs = {"r4_conv": dict(r=4, lora_alpha=8, target_modules=CONV, seed=seed + 1),
             "r8_all": dict(r=8, lora_alpha=16, target_modules="all-linear", seed=seed + 2,
                            target_parameters=EXPERT_PARAMETERS.get(kind))}
    return kind, base, {n: make_peft_adapter(base, root / n, **s) for n, s in specs.items()}


def test_mixed_batch_in_chunks(lfm2, prompts):
    """The base and both adapters over two slots, prompts prefilled in chunks of 7 (each
    from the conv window the last left) beside other sequences' decodes: HF + PEFT's
    tokens and logprobs. Each conv layer's state is its window alone."""
    kind, base, adapters = lfm2
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=8, block_size=8,
                   max_num_batched_tokens=7)
    assert max(len(p) for p in prompts) > 7
    check_mixed_batch(llm, base, adapters, prompts, extra=3)
    runner = llm.llm_engine.model_runner
    assert runner.num_mixed_steps > 0
    assert runner.mamba_state.num_free_slots == runner.max_num_seqs
    assert len(runner.attention_layers) == 1
    assert all(isinstance(m, ShortConv) for m in runner.mixers) and len(runner.mixers) == \
        {"lfm2": 3, "lfm2_moe": 2}[kind]
    assert runner.mixers[0].conv_state.shape == (runner.max_num_seqs, HIDDEN, 2)
    assert state_bytes_per_slot(runner.mixers, torch.float32) == len(runner.mixers) \
        * HIDDEN * 2 * 4
    ffn = llm.llm_engine.model.model.layers[0].feed_forward
    assert ffn.down_proj.in_features == (128 if kind == "lfm2" else 96)


def test_preemption_recomputes_the_state(lfm2, prompts):
    """10 KV blocks of 8 for 5 requests: preempted sequences give their state slot back
    and recompute their conv windows from the prompt exactly."""
    kind, base, adapters = lfm2
    check_preemption(base, adapters, [None, "r8_all", "r4_conv", None, "r8_all"], prompts,
                     shift=1)


def test_fused_experts_load_as_the_hubs(lfm2, tmp_path, prompts):
    """LFM2-MoE saved per expert (the hub's layout, transformers 5's save) and with its
    experts fused: the same tokens and logprobs, base and an adapter on the experts."""
    kind, base, adapters = lfm2
    if kind != "lfm2_moe":
        pytest.skip("LFM2 has no experts")
    fused = fused_experts_checkpoint(base, tmp_path / "fused", ("w1", "w3", "w2"), EXPERTS)
    req = LoRARequest("r8_all", 1, str(adapters["r8_all"]))
    outs = []
    for path in (base, fused):
        llm = make_llm(path, enable_lora=True, max_loras=1, max_lora_rank=8)
        outs.append(llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], GREEDY,
                                 lora_request=[None, req], use_tqdm=False))
    for a, b in zip(*outs, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert la.keys() == lb.keys()
            assert all(abs(la[t].logprob - lb[t].logprob) < 1e-5 for t in la)


def per_expert_adapter(base: Path, out: Path, r: int, seed: int) -> Path:
    """LoRA on every expert's w1 / w3 / w2, a module each (vLLM's layout; transformers 5
    has no such modules, so it is written directly)."""
    modules = [(f"model.layers.{layer}.feed_forward.experts.{e}.{leaf}", d_in, d_out)
               for layer in (1, 2) for e in range(EXPERTS)
               for leaf, (d_in, d_out) in (("w1", (HIDDEN, EXPERT_SIZE)),
                                           ("w3", (HIDDEN, EXPERT_SIZE)),
                                           ("w2", (EXPERT_SIZE, HIDDEN)))]
    return write_lora_adapter(out, modules, r, seed, ["w1", "w3", "w2"], base)


def test_per_expert_adapter(lfm2, tmp_path, prompts):
    """An adapter per expert (experts.{e}.w1 ...) beside the base and a target_parameters
    one in one batch: it matches HF on the merged weights, the others HF + PEFT."""
    kind, base, adapters = lfm2
    if kind != "lfm2_moe":
        pytest.skip("LFM2 has no experts")
    per_expert = per_expert_adapter(base, tmp_path / "per_expert", r=4, seed=186)
    reqs = lora_requests({"per_expert": per_expert, "r8_all": adapters["r8_all"]})
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=8)
    batch = [(prompts[0], None), (prompts[0], "per_expert"), (prompts[1], "r8_all"),
             (prompts[2], "per_expert")]
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in batch], GREEDY,
                        lora_request=[reqs[n] if n else None for _, n in batch],
                        use_tqdm=False)
    assert outs[0].outputs[0].token_ids != outs[1].outputs[0].token_ids
    reference = merged_checkpoint(base, per_expert, tmp_path / "merged")
    check_against_hf([outs[1], outs[3]], reference, [None, None], [prompts[0], prompts[2]])
    check_against_hf([outs[0], outs[2]], base, [None, adapters["r8_all"]],
                     [prompts[0], prompts[1]])


def test_moe_without_expert_bias(tiny_root, prompts):
    """use_expert_bias off: no expert_bias in the checkpoint, the plain top-k of the
    scores; unnormalized weights (norm_topk_prob off) too."""
    if (reason := _skip_reason("lfm2_moe")) is not None:
        pytest.skip(reason)
    base = make_model(tiny_root / "lfm2_moe_no_bias" / "base", "lfm2_moe", 185,
                      use_expert_bias=False, norm_topk_prob=False)
    llm = make_llm(base, max_num_batched_tokens=9, block_size=8)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:3]], GREEDY,
                        use_tqdm=False)
    check_against_hf(outs, base, [None] * 3, prompts[:3])


@torch.no_grad()
def test_routing_weights_are_hfs():
    """LFM2-MoE's routing as HF's Lfm2MoeTopKRouter computes it, to fp32 rounding: the
    same experts, and weights renormalized with its 1e-6 in the sum (1e-20 would differ by
    ~1e-6 of each weight, below what logprobs show)."""
    if (reason := _skip_reason("lfm2_moe")) is not None:
        pytest.skip(reason)
    from transformers.models.lfm2_moe.modeling_lfm2_moe import Lfm2MoeTopKRouter

    cfg = lfm2_moe_config(64)
    cfg.architectures = ["Lfm2MoeForCausalLM"]
    hf = Lfm2MoeTopKRouter(cfg)
    ours = GroupedTopKRouter(HIDDEN, EXPERTS, lfm2_flags(cfg, "Lfm2MoeForCausalLM",
                                                         None)["grouped_topk"])
    gen = torch.Generator().manual_seed(7)
    hf.weight.copy_(torch.randn(hf.weight.shape, generator=gen))
    ours.weight.copy_(hf.weight)
    bias = 0.3 * torch.randn(EXPERTS, generator=gen)
    ours.e_score_correction_bias.copy_(bias)
    x = torch.randn(50, HIDDEN, generator=gen)
    _, want, want_experts = hf(x, bias)
    got, experts = ours.route(x, cfg.num_experts_per_tok, True)
    order, want_order = experts.argsort(-1), want_experts.argsort(-1)
    assert torch.equal(experts.gather(1, order), want_experts.gather(1, want_order))
    torch.testing.assert_close(got.gather(1, order), want.gather(1, want_order), rtol=0,
                               atol=1e-7)


def test_rank_too_high_fails_alone(lfm2, prompts):
    """With max_lora_rank 4 the rank-8 adapter is refused by name, in the engine and over
    HTTP (a 400 in OpenAI's shape); the rank-4 one and the base serve after it."""
    kind, base, adapters = lfm2
    if kind != "lfm2":
        pytest.skip("one server is enough: LFM2's")
    check_rank_refused(base, ("r4_conv", adapters["r4_conv"]), ("r8_all", adapters["r8_all"]),
                       prompts)


def test_ff_size_is_hf_mlp_width():
    """block_auto_adjust_ff_dim as HF's Lfm2MLP sizes it: LFM2-1.2B's 12288 -> 8192, a
    multiplier and rounding, no adjustment at all."""
    if (reason := _skip_reason("lfm2")) is not None:
        pytest.skip(reason)
    from transformers.models.lfm2.modeling_lfm2 import Lfm2MLP
    cases = [dict(hidden_size=64, intermediate_size=12288),
             dict(hidden_size=64, intermediate_size=100, block_ffn_dim_multiplier=1.5,
                  block_multiple_of=32),
             dict(hidden_size=64, intermediate_size=96, block_auto_adjust_ff_dim=False)]
    for kw in cases:
        cfg = transformers.Lfm2Config(num_hidden_layers=1, **kw)
        assert ff_size(cfg) == Lfm2MLP(cfg).w1.out_features, kw


# ---- LFM2-VL on text (models/text_only.py) -------------------------------------------


def _vl_skip_reason() -> str | None:
    if not hasattr(transformers, "Lfm2VlConfig"):
        return f"transformers {transformers.__version__} has no Lfm2VlConfig"
    return None


def make_vl_model(out: Path, seed: int) -> Path:
    """A tiny Lfm2VlForConditionalGeneration: the LFM2 above behind a one-layer SigLIP2
    tower and a projector, saved as transformers 5 saves it (model.language_model.*)."""
    tok = make_tokenizer(out)
    vision = dict(model_type="siglip2_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=2, num_patches=16, patch_size=4)
    cfg = transformers.Lfm2VlConfig(text_config=lfm2_config(len(tok)).to_dict(),
                                    vision_config=vision, image_token_id=len(tok) - 1,
                                    projector_hidden_size=48)
    torch.manual_seed(seed)
    model = transformers.Lfm2VlForConditionalGeneration(cfg)
    _reinit_(model, seed, 0.2)
    model.eval().save_pretrained(str(out))
    return out


def make_vl_adapter(base: Path, out: Path, r: int, targets: str | list[str],
                    seed: int) -> Path:
    """A PEFT adapter trained on the whole VL model (fixtures' make_peft_adapter loads
    AutoModelForCausalLM, which has no LFM2-VL): random A and B."""
    from peft import LoraConfig, get_peft_model

    model = transformers.Lfm2VlForConditionalGeneration.from_pretrained(
        str(base), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                             lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(out))
    return out


@torch.no_grad()
def vl_reference(base: Path, adapter: Path | None, prompt: list[int], n: int
                 ) -> tuple[list[int], torch.Tensor]:
    """HF (+ PEFT) on the VL model, text only: n greedy tokens (cached decode) and the
    log-softmax of each step's logits, recomputed over the whole sequence [n, vocab]."""
    model = transformers.Lfm2VlForConditionalGeneration.from_pretrained(
        str(base), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    ids, past, tokens = torch.tensor([prompt]), None, []
    for _ in range(n):
        res = model(input_ids=ids, past_key_values=past, use_cache=True)
        past = res.past_key_values
        tokens.append(int(res.logits[0, -1].argmax()))
        ids = torch.tensor([[tokens[-1]]])
    logits = model(input_ids=torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:]
    return tokens, torch.log_softmax(logits.float(), dim=-1)


@pytest.fixture(scope="module")
def lfm2_vl(tiny_root: Path) -> tuple[Path, dict[str, Path]]:
    if (reason := _vl_skip_reason()) is not None:
        pytest.skip(reason)
    root = tiny_root / "lfm2_vl"
    base = make_vl_model(root / "base", 190)
    # all-linear: the tower's and the projector's linears too; q / v: the tower's alike
    return base, {"r8_all": make_vl_adapter(base, root / "r8_all", 8, "all-linear", 191),
                  "r4_qv": make_vl_adapter(base, root / "r4_qv", 4,
                                           ["in_proj", "q_proj", "v_proj"], 192)}


def test_vl_text_matches_hf_and_peft(lfm2_vl, prompts):
    """LFM2-VL served by its language model: the base and adapters trained on the whole
    model (their tower LoRA left out) in one batch, prompts in chunks of 7, each output
    HF + PEFT's on the VL model."""
    base, adapters = lfm2_vl
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=8, block_size=8,
                   max_num_batched_tokens=7)
    assert llm.llm_engine.vision is None
    names = [None, "r8_all", "r4_qv", None, "r8_all"]
    batch = [prompts[i % len(prompts)] for i in range(len(names))]
    reqs = lora_requests(adapters)
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], GREEDY,
                        lora_request=[reqs[n] if n else None for n in names], use_tqdm=False)
    for out, name, prompt in zip(outs, names, batch, strict=True):
        got = out.outputs[0].token_ids
        want, ref = vl_reference(base, adapters[name] if name else None, prompt, len(got))
        assert got == want, (name, got, want)
        for step, lp in enumerate(out.outputs[0].logprobs):
            assert all(abs(v.logprob - ref[step, t].item()) < 1e-4 for t, v in lp.items())
    assert len({tuple(o.outputs[0].token_ids) for o in outs[:3]}) == 3


def test_vl_images_are_refused(lfm2_vl, prompts):
    """Without preprocessor_config.json (served on text), an image, offline or in a chat
    request over HTTP (a 400), is refused alone; text goes on."""
    from PIL import Image

    base, _ = lfm2_vl
    llm = make_llm(base)
    with pytest.raises(ValueError, match="no vision tower"):
        llm.generate({"prompt_token_ids": prompts[0],
                      "multi_modal_data": {"image": Image.new("RGB", (8, 8))}}, GREEDY,
                     use_tqdm=False)
    with RemoteServer(base, ["--max-model-len", "128", "--dtype", "float32"]) as server:
        client = server.get_client()
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model=str(base), max_tokens=2,
                messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}, image]}])
        assert "image inputs are not supported" in err.value.body["message"], err.value.body
        r = client.completions.create(model=str(base), prompt=prompts[1], max_tokens=3,
                                      temperature=0, logprobs=0,
                                      extra_body={"return_tokens_as_token_ids": True,
                                                  "ignore_eos": True})
        want = llm.generate([{"prompt_token_ids": prompts[1]}],
                            SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0].token_ids
        assert token_ids_of(r.choices[0].logprobs) == list(want)
