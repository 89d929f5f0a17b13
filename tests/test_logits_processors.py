"""Custom logits processors (vLLM V1's interface): in mixed LoRA batches only the rows
that ask for them change, the others equal HF + PEFT; row indices stay consistent
through chunked prefill, preemption and abort; loading, refusals, and the server."""

from __future__ import annotations

import subprocess

import openai
import pytest

from loraplex import BeamSearchParams, SamplingParams
from loraplex.sampling_params import StructuredOutputsParams
from tests.engine_utils import check_against_hf, lora_requests, make_llm
from tests.logits_processor_fixtures import (
    CountingProcessor,
    DummyLogitsProcessor,
    OnlyTokenForRandomRows,
    RepeatPromptStart,
    counted,
)
from tests.server_utils import RemoteServer, clean_env, serve_cmd

FIXTURES = "tests.logits_processor_fixtures"


def _params(**extra) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2,
                          extra_args=extra or None)


def test_mixed_batch_only_enabled_rows_change(tiny_models, tiny_adapters, prompts):
    """Base + adapters of ranks 4 / 8 / 16 in one batch; the rows with target_token give
    only it, the others are HF + PEFT's; n=2 forks both; beam search (no extra_args, raw
    logprobs) is what it is without the processor, as in vLLM."""
    base, adapters = tiny_models["llama"], tiny_adapters["llama"]
    reqs = lora_requests(adapters)
    names = [None, "r4_qv", "r8_all", None, "r16_rslora", "r8_all"]
    targets = [None, 7, None, 11, None, 300]
    llm = make_llm(base, enable_lora=True, max_loras=3, max_lora_rank=16,
                   logits_processors=[DummyLogitsProcessor])
    params = [_params(**({"target_token": t} if t is not None else {})) for t in targets]
    params.append(SamplingParams(n=2, temperature=0.0, max_tokens=4, ignore_eos=True,
                                 extra_args={"target_token": 5}))
    batch = [prompts[i % len(prompts)] for i in range(len(params))]
    loras = [reqs[n] if n else None for n in names] + [reqs["r4_qv"]]
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, lora_request=loras,
                        use_tqdm=False)
    free = [i for i, t in enumerate(targets) if t is None]
    check_against_hf([outs[i] for i in free], base,
                     [adapters[names[i]] if names[i] else None for i in free],
                     [batch[i] for i in free])
    for i, t in enumerate(targets):
        if t is not None:
            assert outs[i].outputs[0].token_ids == [t] * 6
    assert [o.token_ids for o in outs[-1].outputs] == [[5] * 4, [5] * 4]
    beam = BeamSearchParams(beam_width=2, max_tokens=3)
    plain = make_llm(base, enable_lora=True, max_loras=3, max_lora_rank=16)
    beams = [[s.tokens for s in e.beam_search([{"prompt_token_ids": prompts[0]}], beam,
                                              lora_request=[reqs["r8_all"]])[0].sequences]
             for e in (llm, plain)]
    assert beams[0] == beams[1]


def test_indices_consistent_through_preemption_and_abort(tiny_models, tiny_adapters,
                                                         prompts):
    """A small KV cache (preemption by recompute), prompts in chunks, arrivals while
    others decode and an abort: CountingProcessor checks its indices every step and
    forces each enabled row's tokens from its own recorded prompt and live output."""
    base, adapters = tiny_models["llama"], tiny_adapters["llama"]
    reqs = lora_requests(adapters)
    names = [None, "r4_qv", "r8_all", None, "r4_qv", "r8_all", None, "r16_rslora"]
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=16, max_model_len=64,
                   num_gpu_blocks_override=14, block_size=8, max_num_batched_tokens=12,
                   logits_processors=[f"{FIXTURES}:CountingProcessor"])
    engine = llm.llm_engine
    proc = engine.logits_processors.processors[0]
    assert isinstance(proc, CountingProcessor)
    params = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=1,
                             extra_args={"count": True} if i % 2 else None)
              for i in range(len(names))]
    finished, step = {}, 0
    while step < 3 or engine.has_unfinished_requests():
        if step < len(names):
            i = step
            engine.add_request(str(i), {"prompt_token_ids": prompts[i % len(prompts)]},
                               params[i], lora_request=reqs[names[i]] if names[i] else None)
        if step == 6:
            engine.abort_request("2")
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
        step += 1
    assert engine.scheduler.num_preemptions > 0
    assert proc.seen_moves > 0 and proc.seen_removals > 0
    assert "2" not in finished
    free = [i for i in range(len(names)) if i % 2 == 0 and i != 2]
    check_against_hf([finished[str(i)] for i in free], base,
                     [adapters[names[i]] if names[i] else None for i in free],
                     [prompts[i % len(prompts)] for i in free])
    for i in range(1, len(names), 2):
        prompt = prompts[i % len(prompts)]
        assert finished[str(i)].outputs[0].token_ids == counted(prompt, 20), i


def test_adapter_processor_and_argmax_invariant_placement(tiny_models, prompts):
    """AdapterLogitsProcessor with fn(prompt, output, row) and fn(output, row); an
    argmax-invariant processor runs after temperature: greedy rows keep their argmax,
    random rows sample under it."""
    base = tiny_models["llama"]
    llm = make_llm(base, logits_processors=[RepeatPromptStart, OnlyTokenForRandomRows])
    plain = make_llm(base)
    assert llm.llm_engine.logits_processors.processors[0].max_model_len == 256
    p = prompts[2]
    first = SamplingParams(temperature=0.0, max_tokens=4, extra_args={"repeat": "first"},
                           ignore_eos=True)
    last = SamplingParams(temperature=0.0, max_tokens=5, extra_args={"repeat": "last_output"},
                          ignore_eos=True)
    greedy_only = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True,
                                 extra_args={"only": 9})
    random_only = SamplingParams(temperature=0.8, max_tokens=5, ignore_eos=True, seed=3,
                                 extra_args={"only": 9})
    outs = llm.generate([{"prompt_token_ids": p}] * 4,
                        [first, last, greedy_only, random_only], use_tqdm=False)
    want = plain.generate([{"prompt_token_ids": p}], greedy_only, use_tqdm=False)[0]
    toks = [o.outputs[0].token_ids for o in outs]
    assert toks[0] == [p[0]] * 4
    assert toks[1] == [want.outputs[0].token_ids[0]] * 5
    assert toks[2] == want.outputs[0].token_ids
    assert toks[3] == [9] * 5


def test_structured_outputs_beside_a_processor(tiny_models, prompts):
    """A grammar-constrained request in the same batch as a processed one: each keeps
    its own constraint."""
    llm = make_llm(tiny_models["llama"], logits_processors=[DummyLogitsProcessor])
    choices = ["alpha", "beta"]
    outs = llm.generate(
        [{"prompt_token_ids": prompts[0]}, {"prompt_token_ids": prompts[1]}],
        [SamplingParams(temperature=0.0, max_tokens=8,
                        structured_outputs=StructuredOutputsParams(choice=choices)),
         _params(target_token=42)], use_tqdm=False)
    assert outs[0].outputs[0].text in choices
    assert outs[1].outputs[0].token_ids == [42] * 6


def test_bad_extra_args_fail_alone(tiny_models, prompts):
    llm = make_llm(tiny_models["llama"], logits_processors=[DummyLogitsProcessor])
    engine = llm.llm_engine
    engine.add_request("ok", {"prompt_token_ids": prompts[0]}, _params(target_token=3))
    with pytest.raises(ValueError, match="target_token must be a token id"):
        engine.add_request("bad", {"prompt_token_ids": prompts[1]}, _params(target_token=-1))
    assert "bad" not in engine.requests
    done = []
    while engine.has_unfinished_requests():
        done += [o for o in engine.step() if o.finished]
    assert [o.outputs[0].token_ids for o in done] == [[3] * 6]
    with pytest.raises(ValueError, match="extra_args must be a dict"):
        SamplingParams(extra_args=["target_token"])


def test_loading_and_refusals(tiny_models, tmp_path, monkeypatch):
    base = tiny_models["llama"]
    for spec in (f"{FIXTURES}.DummyLogitsProcessor", f"{FIXTURES}:DummyLogitsProcessor"):
        procs = make_llm(base, logits_processors=[spec]).llm_engine.logits_processors
        assert [type(p) for p in procs.processors] == [DummyLogitsProcessor]
    for spec, words in ((f"{FIXTURES}:Missing", "cannot load"),
                        ("no_such_module_xyz:Proc", "cannot load"),
                        (f"{FIXTURES}:NotAProcessor", "not a subclass")):
        with pytest.raises(ValueError, match=words):
            make_llm(base, logits_processors=[spec])
    with pytest.raises(ValueError, match="speculative decoding"):
        make_llm(base, logits_processors=[DummyLogitsProcessor],
                 speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                     "prompt_lookup_max": 2, "prompt_lookup_min": 1})
    with pytest.raises(ValueError, match="pooling models"):
        make_llm(base, runner="pooling", logits_processors=[DummyLogitsProcessor])
    # an installed plugin (entry point group loraplex.logits_processors) loads by itself
    dist = tmp_path / "lp_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lp-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        f"[loraplex.logits_processors]\ndummy = {FIXTURES}:DummyLogitsProcessor\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    procs = make_llm(base).llm_engine.logits_processors
    assert [type(p) for p in procs.processors] == [DummyLogitsProcessor]


@pytest.fixture(scope="module")
def server(tiny_models, tiny_adapters):
    ad = tiny_adapters["llama"]
    with RemoteServer(tiny_models["llama"],
                      ["--dtype", "float32", "--max-model-len", "256", "--enable-lora",
                       "--max-lora-rank", "16", "--lora-modules", f"r8={ad['r8_all']}",
                       "--logits-processors", f"{FIXTURES}:DummyLogitsProcessor",
                       f"{FIXTURES}.CountingProcessor"]) as srv:
        yield srv


def test_server_xargs(server, tiny_models):
    client = openai.OpenAI(base_url=server.url_for("v1"), api_key="x")
    model = str(tiny_models["llama"])
    base = client.completions.create(model=model, prompt="hello world", max_tokens=4,
                                     temperature=0)
    out = client.completions.create(model="r8", prompt="hello world", max_tokens=4,
                                    temperature=0, logprobs=0,
                                    extra_body={"vllm_xargs": {"target_token": 65},
                                                "ignore_eos": True,
                                                "return_tokens_as_token_ids": True})
    assert out.choices[0].logprobs.tokens == ["token_id:65"] * 4
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
        temperature=0, logprobs=True,
        extra_body={"loraplex_xargs": {"target_token": 66}, "ignore_eos": True,
                    "return_tokens_as_token_ids": True})
    assert [t.token for t in chat.choices[0].logprobs.content] == ["token_id:66"] * 3
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="hi", max_tokens=2,
                                  extra_body={"vllm_xargs": {"target_token": 10**6}})
    assert "target_token must be a token id" in str(err.value)
    again = client.completions.create(model=model, prompt="hello world", max_tokens=4,
                                      temperature=0)
    assert again.choices[0].text == base.choices[0].text


def test_unimportable_processor_fails_start_up(tiny_models):
    cmd = serve_cmd(tiny_models["llama"], "--dtype", "float32", "--max-model-len", "64",
                    "--logits-processors", "no_such_module_xyz:Proc")
    done = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=120)
    assert done.returncode != 0
    assert "cannot load logits processor 'no_such_module_xyz:Proc'" in done.stderr + done.stdout
