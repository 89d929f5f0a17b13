"""LLM.beam_search (vLLM's) against the same search run on HF transformers + PEFT's
logprobs (fp32): the base and adapters in one call, length penalties, EOS; width 1 is
greedy decoding."""

from __future__ import annotations

import pytest

from loraplex import LoRARequest, SamplingParams
from loraplex.beam_search import beam_search_score
from loraplex.sampling_params import BeamSearchParams
from tests.engine_utils import make_llm
from tests.fixtures import hf_logprobs


def reference_beams(base, adapter, prompt: list[int], width: int, max_tokens: int,
                    eos: set[int], length_penalty: float) -> list[tuple[list[int], float]]:
    """The search written out over HF's next-token logprobs: (tokens, cumulative logprob)
    of the `width` best, best first."""
    def score(beam):
        return beam_search_score(beam[0], beam[1], eos, length_penalty)

    live, done = [(list(prompt), 0.0)], []
    for _ in range(max_tokens):
        grown = []
        for tokens, cum in live:
            lp = hf_logprobs(base, adapter, tokens)[-1]
            values, ids = lp.topk(2 * width)
            for v, t in zip(values.tolist(), ids.tolist(), strict=True):
                (done if t in eos else grown).append((tokens + [t], cum + v))
        live = sorted(grown, key=score, reverse=True)[:width]
    return [(t[len(prompt):], c) for t, c in sorted(done + live, key=score, reverse=True)[:width]]


@pytest.mark.parametrize("width, length_penalty", [(3, 1.0), (2, 0.5)])
def test_matches_the_search_on_hf(width, length_penalty, tiny_models, tiny_adapters, prompts):
    base, adapters = tiny_models["llama"], tiny_adapters["llama"]
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=16)
    loras = [None, LoRARequest("r4_qv", 1, str(adapters["r4_qv"])),
             LoRARequest("r8_all", 2, str(adapters["r8_all"]))]
    batch = [{"prompt_token_ids": prompts[i]} for i in range(3)]
    params = BeamSearchParams(beam_width=width, max_tokens=5, length_penalty=length_penalty)
    outs = llm.beam_search(batch, params, lora_request=loras)
    eos = llm.llm_engine.eos_token_ids
    for out, prompt, lora in zip(outs, prompts[:3], loras, strict=True):
        adapter = adapters[lora.lora_name] if lora else None
        want = reference_beams(base, adapter, prompt, width, 5, eos, length_penalty)
        assert len(out.sequences) == width
        for seq, (tokens, cum) in zip(out.sequences, want, strict=True):
            assert seq.tokens == prompt + tokens
            assert seq.cum_logprob == pytest.approx(cum, abs=1e-4)
            assert seq.lora_request == lora and seq.text is not None
        scores = [beam_search_score(s.tokens, s.cum_logprob, eos, length_penalty)
                  for s in out.sequences]
        assert scores == sorted(scores, reverse=True)


def test_width_one_is_greedy(tiny_models, prompts):
    llm = make_llm(tiny_models["llama"])
    beam = llm.beam_search([{"prompt_token_ids": prompts[1]}],
                           BeamSearchParams(beam_width=1, max_tokens=6))[0].sequences[0]
    greedy = llm.generate([{"prompt_token_ids": prompts[1]}],
                          SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0]
    assert beam.tokens[len(prompts[1]):] == greedy.token_ids
    assert beam.finish_reason == "length"


def test_eos_completes_a_beam(tiny_models, prompts):
    """A beam that draws EOS is complete (finish "stop"), scored without the EOS in its
    length; ignore_eos keeps it going."""
    llm = make_llm(tiny_models["llama"], max_logprobs=-1)
    eos = next(iter(llm.llm_engine.eos_token_ids))
    prompt = prompts[0]
    # every token of the 512 is a candidate at a beam as wide as the vocabulary
    out = llm.beam_search([{"prompt_token_ids": prompt}],
                          BeamSearchParams(beam_width=512, max_tokens=1))[0]
    stopped = [s for s in out.sequences if s.tokens[-1] == eos]
    assert stopped and all(s.finish_reason == "stop" for s in stopped)
    assert all(s.finish_reason == "length" for s in out.sequences if s.tokens[-1] != eos)
    assert beam_search_score([1, 2, eos], -3.0, {eos}, 1.0) == -1.5  # EOS not counted
    assert beam_search_score([1, 2, 3], -3.0, {eos}, 0.5) == pytest.approx(-3.0 / 3 ** 0.5)
    kept = llm.beam_search([{"prompt_token_ids": prompt}],
                           BeamSearchParams(beam_width=512, max_tokens=1, ignore_eos=True))[0]
    assert all(s.finish_reason == "length" for s in kept.sequences)


def test_bad_params():
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(ValueError, match="max_tokens"):
        BeamSearchParams(beam_width=2, max_tokens=0)


def test_over_http(tiny_models, tiny_adapters, tokenizer, prompts):
    """vLLM's use_beam_search (extra_body) on both routes with the openai client: n beams,
    best first, the adapter's; the same as the search on HF + PEFT. Streaming or logprobs
    with it are 400s in OpenAI's error shape; the server carries on."""
    import openai

    from tests.server_utils import RemoteServer

    base, adapter = tiny_models["llama"], tiny_adapters["llama"]["r4_qv"]
    args = ["--served-model-name", "tiny", "--enable-lora", "--max-lora-rank", "8",
            "--dtype", "float32", "--max-model-len", "128", "--cpu-kv-cache-gib", "0.05",
            "--lora-modules", f"qv={adapter}"]
    beam = {"use_beam_search": True, "length_penalty": 0.8}
    with RemoteServer(base, args) as server:
        client = server.get_client()
        r = client.completions.create(model="qv", prompt=prompts[1], max_tokens=4, n=3,
                                      extra_body=beam)
        eos = {tokenizer.eos_token_id}
        want = reference_beams(base, adapter, prompts[1], 3, 4, eos, 0.8)
        assert [c.text for c in r.choices] == [tokenizer.decode(t) for t, _ in want]
        assert [c.index for c in r.choices] == [0, 1, 2]
        assert r.usage.completion_tokens == sum(len(t) for t, _ in want)
        chat = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, n=2,
            extra_body=beam)
        assert len(chat.choices) == 2 and chat.choices[0].message.content
        for kw in (dict(stream=True), dict(logprobs=1)):
            with pytest.raises(openai.BadRequestError) as err:
                client.completions.create(model="qv", prompt="Hi", max_tokens=2, n=2,
                                          extra_body=beam, **kw)
            assert "use_beam_search does not support" in err.value.body["message"]
        assert client.completions.create(model="qv", prompt="Hi", max_tokens=2).choices
