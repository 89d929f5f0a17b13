"""vLLM's prompt embeddings (`enable_prompt_embeds`): a prompt given as its rows'
embeddings. Embeddings of token ids give what those ids give; embeddings that are no
token's match HF transformers + PEFT run on the same `inputs_embeds` (fp32), for Llama
with adapters in a mixed batch, and for Gemma, Gemma 3 and Granite (as HF scales what
it is given). Chunked prefill, prefix caching, truncation, the server's
`prompt_embeds` (base64 torch.save) and the refusals."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loraplex import EmbedsPrompt, LoRARequest, SamplingParams
from tests.engine_utils import make_llm
from tests.fixtures import make_peft_adapter, make_tiny_model
from tests.server_utils import RemoteServer

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2)
IDS = [[1, 43, 76, 99, 12, 57, 8], [1, 5, 200, 31]]


def _hf(base: Path, adapter: Path | None = None):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    return PeftModel.from_pretrained(model, adapter).eval() if adapter else model


def _hf_greedy(model, embeds: torch.Tensor, n: int) -> tuple[list[int], list[float]]:
    """HF's greedy tokens from `inputs_embeds`, and each one's logprob."""
    table = model.get_input_embeddings()
    x, tokens, logprobs = embeds[None], [], []
    with torch.no_grad():
        for _ in range(n):
            lp = model(inputs_embeds=x).logits[0, -1].log_softmax(-1)
            t = int(lp.argmax())
            tokens.append(t)
            logprobs.append(float(lp[t]))
            x = torch.cat([x, table(torch.tensor([[t]]))], dim=1)
    return tokens, logprobs


def _not_a_token(model, ids: list[int], seed: int) -> torch.Tensor:
    """Embeddings of `ids` moved off every token's row (so the prompt is no token list)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        e = model.get_input_embeddings()(torch.tensor(ids))
        return e + 0.3 * e.std() * torch.randn(e.shape, generator=gen)


def _check(out, want: tuple[list[int], list[float]]) -> None:
    tokens, logprobs = want
    o = out.outputs[0]
    assert list(o.token_ids) == tokens
    assert [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)] == \
        pytest.approx(logprobs, abs=1e-4)


@pytest.mark.parametrize("budget", [None, 3])
def test_llama_with_adapters_matches_hf_peft(tiny_models, tiny_adapters, budget):
    base, adapters = tiny_models["llama"], tiny_adapters["llama"]
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=16,
                   enable_prompt_embeds=True, max_num_batched_tokens=budget)
    hf = _hf(base)
    names = [None, "r4_qv", "r8_all"]
    embeds = [_not_a_token(hf, IDS[i % 2], seed=i) for i in range(len(names))]
    loras = [LoRARequest(n, i + 1, str(adapters[n])) if n else None
             for i, n in enumerate(names)]
    # one mixed batch: the embedded prompts beside token prompts, over one slot
    prompts = [EmbedsPrompt(prompt_embeds=e) for e in embeds] + [{"prompt_token_ids": IDS[0]}]
    outs = llm.generate(prompts, GREEDY, lora_request=[*loras, loras[2]], use_tqdm=False)
    for out, e, name in zip(outs, embeds, names):
        model = _hf(base, adapters[name]) if name else hf
        _check(out, _hf_greedy(model, e, GREEDY.max_tokens))
        assert out.prompt_token_ids is None and out.prompt is None  # vLLM reports none
    token_out = llm.generate([{"prompt_token_ids": IDS[0]}], GREEDY, lora_request=loras[2],
                             use_tqdm=False)[0]
    assert outs[3].outputs[0].token_ids == token_out.outputs[0].token_ids


def test_embeddings_of_tokens_are_those_tokens(tiny_models, tiny_adapters):
    base = tiny_models["llama"]
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=16,
                   enable_prompt_embeds=True)
    table = _hf(base).get_input_embeddings()
    lora = LoRARequest("r4_qv", 1, str(tiny_adapters["llama"]["r4_qv"]))
    for ids in IDS:
        with torch.no_grad():
            e = table(torch.tensor(ids))
        got, want = llm.generate([{"prompt_embeds": e}, {"prompt_token_ids": ids}], GREEDY,
                                 lora_request=lora, use_tqdm=False)
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        assert got.outputs[0].text == want.outputs[0].text
        assert [lp[t].logprob for t, lp in zip(got.outputs[0].token_ids, got.outputs[0].logprobs)] \
            == pytest.approx([lp[t].logprob for t, lp in zip(want.outputs[0].token_ids,
                                                              want.outputs[0].logprobs)],
                             abs=1e-5)


@pytest.mark.parametrize("arch", ["gemma", "gemma3", "granite"])
def test_given_embeddings_are_scaled_as_hf_scales_them(arch, tiny_root):
    """Granite multiplies the embeddings it is given; Gemma 3 (and Gemma on transformers
    5) scales inside its embedding module, so given ones go in as they are; Gemma on
    transformers 4 scales whatever enters it."""
    base = make_tiny_model(tiny_root / f"embeds_{arch}", arch, seed=97,
                           tie_word_embeddings=True)
    adapter = make_peft_adapter(base, tiny_root / f"embeds_{arch}_lora", r=4, lora_alpha=8,
                                target_modules=["q_proj", "v_proj"], seed=98)
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8,
                   enable_prompt_embeds=True)
    hf = _hf(base)
    e = _not_a_token(hf, IDS[0], seed=5)
    out = llm.generate([{"prompt_embeds": e}], GREEDY,
                       lora_request=LoRARequest("a", 1, str(adapter)), use_tqdm=False)[0]
    _check(out, _hf_greedy(_hf(base, adapter), e, GREEDY.max_tokens))


def test_prefix_cache_truncation_and_refusals(tiny_models):
    base = tiny_models["llama"]
    llm = make_llm(base, enable_prompt_embeds=True, enable_prefix_caching=True, block_size=4)
    hf = _hf(base)
    e = _not_a_token(hf, IDS[0] + IDS[0], seed=1)
    first = llm.generate([{"prompt_embeds": e}], GREEDY, use_tqdm=False)[0]
    again = llm.generate([{"prompt_embeds": e.clone()}], GREEDY, use_tqdm=False)[0]
    other = llm.generate([{"prompt_embeds": e + 0.01}], GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens > 0 and other.num_cached_tokens == 0
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    # truncate_prompt_tokens keeps the last rows, as it keeps a token prompt's last ids
    cut = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2,
                         truncate_prompt_tokens=5)
    _check(llm.generate([{"prompt_embeds": e}], cut, use_tqdm=False)[0],
           _hf_greedy(hf, e[-5:], 6))
    for prompt, params, message in [
        ({"prompt_embeds": e[0]}, GREEDY, "shape"),
        ({"prompt_embeds": e[:, :7]}, GREEDY, "hidden size"),
        ({"prompt_embeds": e[:0]}, GREEDY, "empty"),
        ({"prompt_embeds": e.long()}, GREEDY, "floating point"),
        ({"prompt_embeds": e * float("nan")}, GREEDY, "non-finite"),
        ({"prompt_embeds": e, "prompt_token_ids": [1]}, GREEDY, "only 'cache_salt'"),
        ({"prompt_embeds": e}, SamplingParams(prompt_logprobs=1), "prompt_logprobs"),
    ]:
        with pytest.raises(ValueError, match=message):
            llm.generate([prompt], params, use_tqdm=False)
    off = make_llm(base)
    with pytest.raises(ValueError, match="enable_prompt_embeds"):
        off.generate([{"prompt_embeds": e}], GREEDY, use_tqdm=False)


def _b64(t: torch.Tensor) -> str:
    buf = io.BytesIO()
    torch.save(t, buf)
    return base64.b64encode(buf.getvalue()).decode()


def test_server_completions_with_prompt_embeds(tiny_models, tiny_adapters):
    base, adapters = tiny_models["llama"], tiny_adapters["llama"]
    hf = _hf(base)
    e = _not_a_token(hf, IDS[0], seed=3)
    args = ["--dtype", "float32", "--max-model-len", "128", "--enable-lora", "--max-loras", "1",
            "--max-lora-rank", "16", "--lora-modules", f"r8_all={adapters['r8_all']}"]
    with RemoteServer(base, [*args, "--enable-prompt-embeds"]) as server:
        client = server.get_client()
        res = client.completions.create(
            model="r8_all", prompt="Hello", max_tokens=6, temperature=0, logprobs=1,
            extra_body={"prompt_embeds": [_b64(e), _b64(e[None])], "ignore_eos": True,
                        "return_tokens_as_token_ids": True})
        want, _ = _hf_greedy(_hf(base, adapters["r8_all"]), e, 6)
        assert len(res.choices) == 3  # the embedded prompts first, then the text prompt
        for choice in res.choices[:2]:
            assert [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens] == want
        hello = len(server.post("tokenize", json={"prompt": "Hello"}).json()["tokens"])
        assert res.usage.prompt_tokens == 2 * len(IDS[0]) + hello
        for body, message in [({"prompt_embeds": "not base64!"}, "base64"),
                              ({"prompt_embeds": _b64(torch.zeros(3, 5))}, "hidden size"),
                              ({"prompt_embeds": _b64(e), "echo": True}, "echo")]:
            bad = server.post("v1/completions", json={"model": "r8_all", "max_tokens": 2,
                                                      **body})
            assert bad.status_code == 400 and message in bad.json()["error"]["message"]
        assert client.completions.create(model="r8_all", prompt="Hi", max_tokens=2).choices
    with RemoteServer(base, args) as server:
        bad = server.post("v1/completions", json={"model": "r8_all", "max_tokens": 2,
                                                  "prompt_embeds": _b64(e)})
        assert bad.status_code == 400 and "--enable-prompt-embeds" in \
            bad.json()["error"]["message"]
