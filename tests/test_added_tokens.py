"""Adapters that add tokens to the vocabulary (`lora_extra_vocab_size`) against HF
transformers + PEFT on the resized model: PEFT's three ways of saving the new rows
(resized layers, trainable_token_indices, LoRA over the resized layers) and vLLM's
new_embeddings file, mixed in one batch with the base and a plain adapter over fewer
slots than adapters, tied embeddings, prompt logprobs and chunked prefill, the adapter's
own tokenizer for text, structured outputs, and the errors (too many tokens, no
tokenizer, ids out of range, a base token's row trained), each failing alone."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from loraplex import LoRARequest, SamplingParams
from loraplex.lora.errors import LoRAError
from loraplex.sampling_params import StructuredOutputsParams
from tests.engine_utils import GREEDY, check_against_hf, make_llm
from tests.fixtures import (
    edited_copy,
    hf_greedy,
    make_added_tokens_adapter,
    make_tiny_model,
)
from tests.test_prompt_logprobs import check_batch_with_prompt_logprobs

VOCAB = 512  # the tiny models' vocabulary: added tokens are ids 512..
ADDED = {  # name -> (mode, tokens added)
    "resized": ("resized", ("<tool>", "<think>", "<end_think>")),
    "trainable": ("trainable_tokens", ("<a>", "<b>")),
    "vocab_lora": ("vocab_lora", ("<w>", "<x>", "<y>", "<z>")),
}


@pytest.fixture(scope="module")
def added_adapters(tiny_root: Path, tiny_models: dict[str, Path]) -> dict[str, Path]:
    return {name: make_added_tokens_adapter(tiny_models["llama"], tiny_root / "added" / name,
                                            mode=mode, new_tokens=tokens, seed=40 + i)
            for i, (name, (mode, tokens)) in enumerate(ADDED.items())}


def _reqs(adapters: dict[str, Path]) -> dict[str, LoRARequest]:
    return {n: LoRARequest(n, i + 1, str(p)) for i, (n, p) in enumerate(adapters.items())}


def _prompt_with_added(prompt: list[int], n: int) -> list[int]:
    """The prompt with each of the adapter's n added ids spliced in."""
    return prompt[:3] + [VOCAB + i for i in range(n)] + prompt[3:]


def test_added_tokens_in_a_mixed_batch_match_peft(tiny_models, tiny_adapters, added_adapters,
                                                  prompts):
    """Base, the three added-token adapters (3, 2 and 4 tokens) and a plain q/v adapter in
    one generate call over 2 slots; prompts hold the added ids; every output equals HF +
    PEFT on the resized model, and the adapters do generate their added tokens."""
    base = tiny_models["llama"]
    adapters = {**added_adapters, "r4_qv": tiny_adapters["llama"]["r4_qv"]}
    reqs = _reqs(adapters)
    names = [None, *ADDED, "r4_qv", "resized", None, "vocab_lora"]
    batch = [_prompt_with_added(prompts[i % len(prompts)], len(ADDED[n][1])) if n in ADDED
             else prompts[i % len(prompts)] for i, n in enumerate(names)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=3)
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=8, max_cpu_loras=4)
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], params,
                        lora_request=[reqs[n] if n else None for n in names], use_tqdm=False)
    check_against_hf(outs, base, [adapters[n] if n else None for n in names], batch)
    for name, out in zip(names, outs):
        ids = out.outputs[0].token_ids
        if name in ADDED:
            assert any(t >= VOCAB for t in ids), (name, ids)  # its own tokens come out
            assert max(ids) < VOCAB + len(ADDED[name][1])
        else:
            assert max(ids) < VOCAB
    assert llm.llm_engine.model_runner.extra_vocab.extra_vocab_size == 256  # vLLM's default


@pytest.mark.parametrize("budget", [None, 5])
def test_prompt_logprobs_and_chunked_prefill(budget, tiny_models, added_adapters, prompts):
    """Prompt logprobs over added ids (the columns past the base vocabulary included);
    budget 5 cuts the prompts into chunks."""
    base = tiny_models["llama"]
    reqs = _reqs(added_adapters)
    names = ["vocab_lora", None, "trainable"]
    batch = [_prompt_with_added(prompts[-1], len(ADDED[n][1])) if n else prompts[-1]
             for n in names]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=2,
                            prompt_logprobs=2)
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=8,
                   max_num_batched_tokens=budget)
    check_batch_with_prompt_logprobs(llm, base, batch, [reqs[n] if n else None for n in names],
                                     [added_adapters[n] if n else None for n in names], params)


@pytest.mark.parametrize("mode", ["resized", "trainable_tokens"])
def test_tied_embeddings(mode, tmp_path, prompts):
    """With tied embeddings an added token's output row is its input row."""
    base = make_tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    adapter = make_added_tokens_adapter(base, tmp_path / "a", mode=mode, row_std=2.0)
    prompt = _prompt_with_added(prompts[2], 3)
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8)
    outs = llm.generate([{"prompt_token_ids": p} for p in (prompt, prompts[2])], GREEDY,
                        lora_request=[LoRARequest("a", 1, str(adapter)), None], use_tqdm=False)
    check_against_hf(outs, base, [adapter, None], [prompt, prompts[2]])
    assert any(t >= VOCAB for t in outs[0].outputs[0].token_ids)


def test_vllm_new_embeddings_file(tmp_path, tiny_models, added_adapters, prompts):
    """vLLM's format (new_embeddings.safetensors: input_embeddings / output_embeddings)
    serves the same adapter as PEFT's resized layers."""
    src = added_adapters["resized"]
    dst = tmp_path / "vllm_format"
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "adapter_model.safetensors"))
    rows = {"input_embeddings": tensors.pop("base_model.model.model.embed_tokens.weight")[VOCAB:],
            "output_embeddings": tensors.pop("base_model.model.lm_head.weight")[VOCAB:]}
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    save_file(rows, str(dst / "new_embeddings.safetensors"))
    prompt = _prompt_with_added(prompts[1], 3)
    llm = make_llm(tiny_models["llama"], enable_lora=True, max_loras=2, max_lora_rank=8)
    outs = llm.generate([{"prompt_token_ids": prompt}] * 2, GREEDY,
                        lora_request=[LoRARequest("peft", 1, str(src)),
                                      LoRARequest("vllm", 2, str(dst))], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    assert outs[0].outputs[0].token_ids == hf_greedy(tiny_models["llama"], src, prompt, 8)


def test_text_goes_through_the_adapters_tokenizer(tiny_models, added_adapters):
    """A text prompt of a request for the adapter is encoded with its tokenizer (the added
    tokens become their ids) and its output decoded with it; the base's requests keep the
    base tokenizer. LLM.chat renders with the adapter's tokenizer too."""
    base, src = tiny_models["llama"], added_adapters["resized"]
    req = LoRARequest("resized", 1, str(src))
    tok = AutoTokenizer.from_pretrained(str(src))
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8)
    text = "Hello <tool> world <think>"
    outs = llm.generate([text, text], GREEDY, lora_request=[req, None], use_tqdm=False)
    assert outs[0].prompt_token_ids == tok.encode(text)
    assert {VOCAB, VOCAB + 1} <= set(outs[0].prompt_token_ids)
    assert outs[1].prompt_token_ids == llm.get_tokenizer().encode(text)
    assert max(outs[1].prompt_token_ids) < VOCAB
    got = outs[0].outputs[0]
    assert any(t >= VOCAB for t in got.token_ids)
    # (a trailing incomplete UTF-8 byte is held back, as for the base)
    assert got.text == tok.decode(got.token_ids).rstrip("\ufffd")
    assert "<" in got.text  # an added token's own text, e.g. "<think>"
    assert llm.llm_engine.get_tokenizer(req) is not llm.get_tokenizer()
    chat = llm.chat([{"role": "user", "content": "Hi <tool>"}], GREEDY, use_tqdm=False,
                    lora_request=req)[0]
    assert VOCAB in chat.prompt_token_ids


def test_hub_adapter_that_adds_tokens(tmp_path, tiny_models, added_adapters, monkeypatch,
                                     prompts):
    """A hub id (here from an offline hub cache) given straight to LLM.generate / chat:
    it is fetched and read before its prompts are encoded, so its added tokens are known
    (text through its tokenizer, ids past the vocabulary accepted), equal to HF + PEFT."""
    import huggingface_hub.constants as hub

    revision = "1" * 40
    repo = tmp_path / "models--org--added"
    snapshot = repo / "snapshots" / revision
    shutil.copytree(added_adapters["resized"], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    base = tiny_models["llama"]
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8)
    req = LoRARequest("hub", 1, "org/added")
    ids = _prompt_with_added(prompts[1], 3)
    outs = llm.generate(["Hello <tool> world", {"prompt_token_ids": ids}], GREEDY,
                        lora_request=req, use_tqdm=False)
    assert VOCAB in outs[0].prompt_token_ids
    check_against_hf(outs, base, [snapshot, snapshot], [outs[0].prompt_token_ids, ids])
    chat = llm.chat([{"role": "user", "content": "Hi <think>"}], GREEDY, use_tqdm=False,
                    lora_request=LoRARequest("hub2", 2, "org/added"))[0]
    assert VOCAB + 1 in chat.prompt_token_ids


def test_structured_outputs_never_pick_added_tokens(tiny_models, added_adapters):
    """The grammar knows the base vocabulary only: an adapter's added tokens are
    disallowed where a grammar constrains the row."""
    llm = make_llm(tiny_models["llama"], enable_lora=True, max_loras=1, max_lora_rank=8)
    params = SamplingParams(temperature=0.0, max_tokens=8,
                            structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    req = LoRARequest("resized", 1, str(added_adapters["resized"]))
    out = llm.generate(["Answer: <tool>"], params, lora_request=req, use_tqdm=False)[0]
    assert out.outputs[0].text in ("yes", "no")
    assert max(out.outputs[0].token_ids) < VOCAB


def test_added_tokens_through_decode_graphs(monkeypatch, tiny_models, added_adapters, prompts):
    """Decode steps replayed from graphs (real ones on a GPU; on the CPU stand-ins that
    re-run the captured step, under the graph's LoRA metadata): the embedding swaps in
    added tokens' rows inside the graph, over slots the adapters are swapped through."""
    from tests.test_cuda_graphs import llm_with_decode_graphs

    base = tiny_models["llama"]
    llm = llm_with_decode_graphs(monkeypatch, base, enable_lora=True, max_loras=2,
                                 max_lora_rank=8, max_num_seqs=8, block_size=8,
                                 max_model_len=64)
    runner = llm.llm_engine.model_runner
    reqs = _reqs(added_adapters)
    names = ["resized", None, "vocab_lora", "trainable", "resized"]
    batch = [_prompt_with_added(prompts[i], len(ADDED[n][1])) if n else prompts[i]
             for i, n in enumerate(names)]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, logprobs=2)
              for m in (6, 9, 4, 7, 5)]
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], params,
                        lora_request=[reqs[n] if n else None for n in names], use_tqdm=False)
    assert runner.cuda_graphs.num_replays > 0 and runner.num_eager_decode_steps == 0
    check_against_hf(outs, base, [added_adapters[n] if n else None for n in names], batch,
                     atol=2e-3 if torch.cuda.is_available() else 1e-4)
    assert any(t >= VOCAB for o in outs for t in o.outputs[0].token_ids)


def test_bad_added_token_adapters_fail_alone(tmp_path, tiny_models, added_adapters, prompts):
    """More added tokens than lora_extra_vocab_size (the seed's message), no tokenizer,
    ids past the request's vocabulary, and a trained base-vocabulary row each fail alone;
    the engine serves the good adapter and the base meanwhile."""
    base = tiny_models["llama"]
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=8,
                   lora_extra_vocab_size=3)
    engine = llm.llm_engine
    good = LoRARequest("resized", 1, str(added_adapters["resized"]))
    too_many = LoRARequest("vocab_lora", 2, str(added_adapters["vocab_lora"]))
    with pytest.raises(LoRAError, match="has 4 extra embeddings .*, but lora_extra_vocab_size="
                                        "3; restart with --lora-extra-vocab-size 4"):
        engine.add_request("many", {"prompt_token_ids": prompts[0]}, GREEDY,
                           lora_request=too_many)
    no_tok_dir = edited_copy(added_adapters["resized"], tmp_path / "nt")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tok_dir / name).unlink()
    no_tok = LoRARequest("no_tok", 3, str(no_tok_dir))
    with pytest.raises(LoRAError, match="adds 3 tokens to the vocabulary but .* no usable "
                                        "tokenizer"):
        engine.add_request("no_tok", "Hi", GREEDY, lora_request=no_tok)
    with pytest.raises(ValueError, match=r"prompt token id 512 is out of range \[0, 512\)"):
        engine.add_request("base_oov", {"prompt_token_ids": [1, 512]}, GREEDY)
    with pytest.raises(ValueError, match=r"token id 515 is out of range \[0, 515\)"):
        engine.add_request("adapter_oov", {"prompt_token_ids": [1, 515]}, GREEDY,
                           lora_request=good)
    # trainable_token_indices over a base token: read off the step loop, fails its request
    inside = LoRARequest("inside", 4, str(edited_copy(
        added_adapters["trainable"], tmp_path / "inside",
        lambda c: c.update(trainable_token_indices=[7, VOCAB + 1]))))
    engine.add_request("inside", {"prompt_token_ids": prompts[1]}, GREEDY, lora_request=inside)
    ok_prompt = _prompt_with_added(prompts[2], 3)
    engine.add_request("good", {"prompt_token_ids": ok_prompt}, GREEDY, lora_request=good)
    engine.add_request("base", {"prompt_token_ids": prompts[3]}, GREEDY)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert sorted(done) == ["base", "good", "inside"]
    assert done["inside"].outputs[0].finish_reason == "error"
    assert "trains the embeddings of 1 token(s) of the base vocabulary" in done["inside"].error
    check_against_hf([done["good"], done["base"]], base,
                     [added_adapters["resized"], None], [ok_prompt, prompts[3]])


def test_extra_rows_are_in_the_memory_budget(tiny_models):
    """Each slot holds lora_extra_vocab_size input and output rows, whatever its rank."""
    llm = make_llm(tiny_models["llama"], enable_lora=True, max_loras=2, max_lora_rank=8,
                   lora_extra_vocab_size=100)
    plan = llm.llm_engine.memory
    extra = llm.llm_engine.model_runner.extra_vocab
    assert plan.fixed_slot_bytes == 2 * 100 * 64 * 4 == extra.slot_bytes()
    assert plan.lora_slot_bytes == 2 * (8 * plan.bytes_per_rank + plan.fixed_slot_bytes)
    off = make_llm(tiny_models["llama"], enable_lora=True, max_loras=2, max_lora_rank=8,
                   lora_extra_vocab_size=0)
    assert off.llm_engine.model_runner.extra_vocab is None
    assert off.llm_engine.memory.fixed_slot_bytes == 0
    assert torch.equal(extra.input_embeddings, torch.zeros_like(extra.input_embeddings))
