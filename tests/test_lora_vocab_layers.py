"""LoRA on the token embedding and on lm_head (PEFT's lora_embedding_A/B and a LoRA'd
lm_head) against HF transformers + PEFT: mixed in one batch with the base and other
adapters, more adapters than max_loras, chunked prefill, prompt logprobs through lm_head's
LoRA, tied embeddings, the Triton ops, and the embed_tokens / lm_head copies that PEFT
saves beside their LoRA (an unchanged copy loads; a trained or resized one fails alone)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex import LoRARequest, SamplingParams
from loraplex.lora import ops
from loraplex.lora.errors import LoRAError
from loraplex.lora.layers import EmbeddingWithLoRA
from loraplex.lora.meta import LoRABatchMeta
from loraplex.worker.context import StepContext, step_context
from tests.engine_utils import GREEDY, check_against_hf, check_mixed_batch, make_llm, run_staggered
from tests.fixtures import make_peft_adapter, make_tiny_model
from tests.test_prompt_logprobs import check_batch_with_prompt_logprobs

VOCAB_SPECS = {
    "vocab_r8": dict(r=8, lora_alpha=16, seed=21,
                     target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"]),
    "emb_r16": dict(r=16, lora_alpha=8, target_modules=["embed_tokens"], seed=22),
    "head_r4": dict(r=4, lora_alpha=8, target_modules=["lm_head"], seed=23),
}


@pytest.fixture(scope="module")
def vocab_adapters(tiny_root: Path, tiny_models: dict[str, Path]) -> dict[str, dict[str, Path]]:
    """arch -> {name -> adapter dir} for llama and qwen2 (saved with PEFT's defaults: a
    copy of embed_tokens / lm_head beside their LoRA)."""
    return {arch: {name: make_peft_adapter(tiny_models[arch],
                                           tiny_root / "vocab_adapters" / arch / name, **spec)
                   for name, spec in VOCAB_SPECS.items()}
            for arch in ("llama", "qwen2")}


def _requests(adapters: dict[str, Path], first_id: int = 1) -> dict[str, LoRARequest]:
    return {n: LoRARequest(n, first_id + i, str(p)) for i, (n, p) in enumerate(adapters.items())}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_embedding_and_lm_head_lora_in_a_mixed_batch_match_peft(arch, tiny_models,
                                                                  tiny_adapters, vocab_adapters,
                                                                  prompts):
    """Base, the three vocab adapters and a q/v adapter in one generate call, two slots."""
    base = tiny_models[arch]
    adapters = {**vocab_adapters[arch], "r4_qv": tiny_adapters[arch]["r4_qv"]}
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=16, max_cpu_loras=3)
    # each adapter changes the output: the embedding-only and lm_head-only ones too
    check_mixed_batch(llm, base, adapters, prompts, extra=6)
    layers = llm.llm_engine.lora_manager.layers
    assert isinstance(layers["model.embed_tokens"], EmbeddingWithLoRA) and "lm_head" in layers


@pytest.mark.parametrize("budget", [None, 6])
def test_chunked_prefill_and_prompt_logprobs_through_lm_head_lora(budget, tiny_models,
                                                                  vocab_adapters, prompts):
    """Prompt logprobs are lm_head's output at every prompt position: with an adapter on
    lm_head they are that adapter's; budget 6 cuts prompts into chunks."""
    base, adapters = tiny_models["llama"], vocab_adapters["llama"]
    reqs = _requests(adapters)
    names = [None, "head_r4", "vocab_r8", "emb_r16"]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=3,
                            prompt_logprobs=2)
    llm = make_llm(base, enable_lora=True, max_loras=3, max_lora_rank=16,
                   max_num_batched_tokens=budget)
    batch = [prompts[-1 - i] for i in range(len(names))]
    assert budget is None or max(map(len, batch)) > 2 * budget
    check_batch_with_prompt_logprobs(llm, base, batch, [reqs[n] if n else None for n in names],
                                     [adapters[n] if n else None for n in names], params)


def test_tied_embeddings(tmp_path, prompts):
    """lm_head is the embedding matrix: each still gets its own LoRA."""
    base = make_tiny_model(tmp_path / "tied", "qwen2", seed=5, tie_word_embeddings=True)
    adapter = make_peft_adapter(base, tmp_path / "tied_lora", r=8, seed=6,
                                target_modules=["embed_tokens", "lm_head", "o_proj"])
    llm = make_llm(base, enable_lora=True, max_lora_rank=8)
    model = llm.llm_engine.model
    assert model.lm_head.base_layer.weight is model.model.embed_tokens.base_layer.weight
    outs = llm.generate([{"prompt_token_ids": prompts[2]}] * 2, GREEDY,
                        lora_request=[None, LoRARequest("t", 1, str(adapter))], use_tqdm=False)
    check_against_hf(outs, base, [None, adapter], [prompts[2]] * 2)


def test_triton_ops_for_embedding_and_lm_head_lora(monkeypatch, tiny_models, vocab_adapters,
                                                   prompts):
    """The same through the Triton LoRA ops (interpreted on CPU tensors without a GPU):
    the embedding's gathered columns go through the expand kernel, lm_head through both,
    in mixed prefill + decode steps."""
    from tests.test_triton_lora_ops import triton_ops

    if not triton_ops._INTERPRETED and not torch.cuda.is_available():
        pytest.skip("Triton runs here only on a GPU or under TRITON_INTERPRET=1")
    monkeypatch.setenv("LORAPLEX_LORA_BACKEND", "triton")
    base, adapters = tiny_models["llama"], vocab_adapters["llama"]
    reqs = _requests(adapters)
    names = [None, "vocab_r8", "emb_r16", "head_r4"]
    jobs = [(2 * i, prompts[i], reqs[n] if n else None) for i, n in enumerate(names)]
    llm = make_llm(base, enable_lora=True, max_loras=3, max_lora_rank=16)
    for name in names[1:]:
        llm.llm_engine.add_lora(reqs[name])
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=3)
    outs, mixed = run_staggered(llm.llm_engine, jobs, params)
    device = llm.llm_engine.model_runner.device
    assert mixed > 0 and ops.backend(torch.zeros(1, device=device)) is triton_ops
    check_against_hf(outs, base, [adapters[n] if n else None for n in names],
                     [p for _, p, _ in jobs])


def test_embedding_layer_is_the_formula():
    """y[i] = E[t_i] + B[s_i] A[s_i][:, t_i] per token, slot -1 = the embedding alone."""
    gen = torch.Generator().manual_seed(0)
    vocab, hidden = 50, 12
    layer = EmbeddingWithLoRA(torch.nn.Embedding(vocab, hidden), max_loras=3, max_rank=8,
                              dtype=torch.float32)
    a = {0: torch.randn(3, vocab, generator=gen), 2: torch.randn(8, vocab, generator=gen)}
    b = {0: torch.randn(hidden, 3, generator=gen), 2: torch.randn(hidden, 8, generator=gen)}
    for s in a:
        layer.set_lora(s, [a[s]], [b[s]])
    ids = torch.tensor([4, 9, 4, 49, 0, 17])
    slots = [2, -1, 0, 2, 0, -1]
    with step_context(StepContext(is_prefill=True, slot_mapping=torch.empty(0),
                                  lora_meta=LoRABatchMeta.make(slots, torch.device("cpu")))):
        got = layer(ids)
    want = layer.base_layer(ids).clone()
    for i, (t, s) in enumerate(zip(ids.tolist(), slots)):
        if s >= 0:
            want[i] += b[s] @ a[s][:, t]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _rewrite(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "adapter_model.safetensors"))
    save_file(edit(tensors), str(dst / "adapter_model.safetensors"))
    return dst


def test_saved_embedding_copies(tmp_path, tiny_models, vocab_adapters, prompts):
    """Without the copies (save_embedding_layers=False) the adapter is the same adapter;
    a changed copy (trained embeddings) fails only the requests for that adapter, with the
    reason; a resized one with no tokenizer for the rows it adds is refused when its
    request is added."""
    base, src = tiny_models["llama"], vocab_adapters["llama"]["vocab_r8"]
    copies = [k for k in load_file(str(src / "adapter_model.safetensors"))
              if k.endswith("base_layer.weight")]
    assert sorted(k.split(".")[-3] for k in copies) == ["embed_tokens", "lm_head"]

    def drop(t):
        return {k: v for k, v in t.items() if k not in copies}

    def trained(t):
        key = next(k for k in copies if "embed_tokens" in k)
        return {**t, key: t[key] + 0.01}

    def resized(t):
        key = next(k for k in copies if "lm_head" in k)
        return {**t, key: torch.cat([t[key], torch.zeros(4, t[key].shape[1])])}

    lean = LoRARequest("lean", 1, str(_rewrite(src, tmp_path / "lean", drop)))
    bad = {"trained": (LoRARequest("trained", 2, str(_rewrite(src, tmp_path / "tr", trained))),
                       "differ from the base model's")}
    resized_req = LoRARequest("resized", 3, str(_rewrite(src, tmp_path / "rs", resized)))
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=8)
    engine = llm.llm_engine
    with pytest.raises(LoRAError, match="adds 4 tokens to the vocabulary but .* no usable "
                                        "tokenizer"):
        engine.add_request("resized", {"prompt_token_ids": prompts[2]}, GREEDY,
                           lora_request=resized_req)
    engine.add_request("lean", {"prompt_token_ids": prompts[0]}, GREEDY, lora_request=lean)
    engine.add_request("base", {"prompt_token_ids": prompts[1]}, GREEDY)
    for name, (req, _) in bad.items():
        engine.add_request(name, {"prompt_token_ids": prompts[2]}, GREEDY, lora_request=req)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    for name, (_, message) in bad.items():
        assert done[name].outputs[0].finish_reason == "error", name
        assert message in done[name].error, (name, done[name].error)
    check_against_hf([done["lean"], done["base"]], base, [src, None], prompts[:2])
