"""The seeds' Python examples, with only `vllm` -> `loraplex` changed (and model ids /
adapter paths pointed at the tiny offline fixtures, since tests have no network)."""

from __future__ import annotations

import warnings

import pytest


@pytest.fixture
def paths(tiny_models, tiny_adapters):
    ad = tiny_adapters["llama"]
    return str(tiny_models["llama"]), str(ad["r8_all"]), str(ad["r4_qv"])


def test_seed_001_offline(paths, capsys):
    model, sql_lora_path, _ = paths
    from loraplex import LLM, SamplingParams
    from loraplex.lora.request import LoRARequest

    llm = LLM(model=model, enable_lora=True)
    sampling_params = SamplingParams(temperature=0, max_tokens=256, stop=["[/assistant]"])
    prompts = ["[user] Write a SQL query to answer the question based on the table schema.\n\n"
               "context: CREATE TABLE airports (icao VARCHAR, airport VARCHAR)\n\n"
               "question: Name the ICAO for Lilongwe International Airport [/user] [assistant]"]
    outputs = llm.generate(prompts, sampling_params,
                           lora_request=LoRARequest("sql_adapter", 1, sql_lora_path))
    for output in outputs:
        print(f"Generated SQL: {output.outputs[0].text}")
    assert "Generated SQL:" in capsys.readouterr().out
    assert outputs[0].finished and outputs[0].outputs[0].finish_reason in ("stop", "length")


def test_seed_001_engine_loop(paths, capsys):
    model, sql_path, math_path = paths
    from loraplex import EngineArgs, LLMEngine, SamplingParams
    from loraplex.lora.request import LoRARequest

    engine_args = EngineArgs(model=model, enable_lora=True, max_loras=2, max_lora_rank=64,
                             max_cpu_loras=4)
    engine = LLMEngine.from_engine_args(engine_args)
    requests = [
        ("Base model prompt", None),
        ("SQL task prompt", LoRARequest("sql-lora", 1, sql_path)),
        ("Math task prompt", LoRARequest("math-lora", 2, math_path)),
        ("Another SQL prompt", LoRARequest("sql-lora", 1, sql_path)),
    ]
    sampling_params = SamplingParams(temperature=0.8, max_tokens=256)
    for i, (prompt, lora_request) in enumerate(requests):
        engine.add_request(str(i), prompt, sampling_params, lora_request=lora_request)
    while engine.has_unfinished_requests():
        outputs = engine.step()
        for output in outputs:
            if output.finished:
                print(f"Request {output.request_id}: {output.outputs[0].text}")
    printed = capsys.readouterr().out
    assert all(f"Request {i}:" in printed for i in range(4))


def test_seed_001_complete_example(paths, capsys):
    model, sql_adapter, _ = paths
    from loraplex import LLM, SamplingParams
    from loraplex.lora.request import LoRARequest

    llm = LLM(model=model, enable_lora=True, max_loras=2, max_lora_rank=64, max_cpu_loras=5)
    sampling_params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=200)
    requests = [
        {"prompt": "Explain what LoRA adapters are:", "lora_request": None},
        {"prompt": "[user] Generate SQL: SELECT users WHERE age > [/user] [assistant]",
         "lora_request": LoRARequest("sql", 1, sql_adapter)},
        {"prompt": "[user] Generate SQL: JOIN tables on [/user] [assistant]",
         "lora_request": LoRARequest("sql", 1, sql_adapter)},
    ]
    for req in requests:
        outputs = llm.generate(req["prompt"], sampling_params, lora_request=req["lora_request"])
        adapter = req["lora_request"].lora_name if req["lora_request"] else "base"
        print(f"Adapter: {adapter}")
        print(f"Output: {outputs[0].outputs[0].text}")
        print("-" * 80)
    assert capsys.readouterr().out.count("Adapter: sql") == 2


def test_seed_003_multilora_engine(paths):
    """003's multilora_inference pattern: max_loras=1, rank 8, CPU cache of 2, three adapters
    taking turns in one slot."""
    model, lora_a, lora_b = paths
    from loraplex import EngineArgs, LLMEngine, SamplingParams
    from loraplex.lora.request import LoRARequest

    engine = LLMEngine.from_engine_args(EngineArgs(
        model=model, enable_lora=True, max_loras=1, max_lora_rank=8, max_cpu_loras=2,
        max_num_seqs=256))
    test_prompts = [
        ("A robot may not injure a human being", SamplingParams(temperature=0.0, logprobs=1,
                                                                max_tokens=128), None),
        ("To be or not to be,", SamplingParams(temperature=0.8, top_k=5,
                                               presence_penalty=0.2, max_tokens=128), None),
        ("[user] Write a SQL query [/user] [assistant]",
         SamplingParams(temperature=0.0, logprobs=1, max_tokens=128, stop_token_ids=[3]),
         LoRARequest("sql-lora", 1, lora_a)),
        ("[user] Write a SQL query [/user] [assistant]",
         SamplingParams(temperature=0.0, logprobs=1, max_tokens=128, stop_token_ids=[3]),
         LoRARequest("sql-lora2", 2, lora_b)),
    ]
    request_id, finished = 0, {}
    while test_prompts or engine.has_unfinished_requests():
        if test_prompts:
            prompt, sampling_params, lora_request = test_prompts.pop(0)
            engine.add_request(str(request_id), prompt, sampling_params,
                               lora_request=lora_request)
            request_id += 1
        for request_output in engine.step():
            if request_output.finished:
                finished[request_output.request_id] = request_output
    assert sorted(finished) == ["0", "1", "2", "3"]
    assert finished["2"].outputs[0].logprobs is not None


def test_seed_004_lora_local_path(paths):
    model, adapter_path, _ = paths
    from loraplex import LLM, SamplingParams
    from loraplex.lora.request import LoRARequest

    llm = LLM(model=model, enable_lora=True, max_lora_rank=16)
    sampling_params = SamplingParams(max_tokens=200, temperature=0.7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora_request = LoRARequest(
            lora_name="medical-qa",
            lora_int_id=1,  # unique integer ID
            lora_local_path=adapter_path,
        )
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    outputs = llm.generate(["What are the symptoms of type 2 diabetes?"], sampling_params,
                           lora_request=lora_request)
    print(outputs[0].outputs[0].text)
    assert lora_request.lora_path == adapter_path
    assert outputs[0].finished
