"""Embeddings (runner="pooling") with a LoRA adapter per request, against HF + PEFT.

The reference: the HF model's decoder (`.model`, after the final norm) with the PEFT
adapter applied, in fp32; its final hidden states pooled (last token, mean or first) and
L2-normalized here. loraplex runs the same prompts in mixed batches (the base and
adapters of different ranks together, more adapters than max_loras), chunked or not.
"""

from __future__ import annotations

import base64
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from loraplex import LLM, LoRARequest, PoolingParams, SamplingParams
from tests.fixtures import SAMPLE_SENTENCES, load_hf_model
from tests.server_utils import RemoteServer

ARCH = "qwen2"  # qkv bias: the adapters' q/k/v LoRA beside a bias
ADAPTERS = ("r4_qv", "r8_all", "r16_rslora")  # ranks 4, 8, 16
PROMPTS = list(SAMPLE_SENTENCES[:6])


def _lora(name: str | None, adapters: dict[str, Path]) -> LoRARequest | None:
    return None if name is None else LoRARequest(name, ADAPTERS.index(name) + 1,
                                                 str(adapters[name]))


@torch.no_grad()
def hf_hidden(base: Path, adapter: Path | None, ids: list[int]) -> torch.Tensor:
    """HF (+ PEFT)'s final hidden states [tokens, hidden], after the final norm."""
    model = load_hf_model(base, adapter)
    decoder = model.get_base_model().model if adapter is not None else model.model
    return decoder(torch.tensor([ids])).last_hidden_state[0].float()


def hf_embedding(base: Path, adapter: Path | None, ids: list[int], pooling: str = "LAST",
                 normalize: bool = True, dimensions: int | None = None) -> torch.Tensor:
    hidden = hf_hidden(base, adapter, ids)
    pooled = {"LAST": hidden[-1], "MEAN": hidden.mean(0), "CLS": hidden[0]}[pooling]
    if dimensions is not None:
        pooled = pooled[:dimensions]
    return F.normalize(pooled, dim=-1) if normalize else pooled


def assert_same(got: list[float] | torch.Tensor, ref: torch.Tensor) -> None:
    got = torch.as_tensor(got, dtype=torch.float32)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 2e-5, (got - ref).abs().max().item()
    assert F.cosine_similarity(got, ref, dim=0).item() > 0.99999


@pytest.fixture(scope="module")
def base(tiny_models) -> Path:
    return tiny_models[ARCH]


@pytest.fixture(scope="module")
def adapters(tiny_adapters) -> dict[str, Path]:
    return tiny_adapters[ARCH]


def _pooling_llm(model: Path | str, **kw) -> LLM:
    kw = {"enable_lora": True, "max_loras": 2, "max_lora_rank": 16, "max_cpu_loras": 4,
          "max_model_len": 256, **kw}
    return LLM(str(model), **kw)


# ---- LLM.embed ---------------------------------------------------------------------------
def test_mixed_batch_last_token_matches_hf_peft(base, adapters):
    """One embed call: the base and three adapters (ranks 4, 8, 16; max_loras=2) over
    prompts of different lengths, each equal to HF + PEFT with its adapter alone."""
    llm = _pooling_llm(base, runner="pooling")
    names = [None, "r4_qv", "r8_all", "r16_rslora", "r8_all", None, "r16_rslora", "r4_qv"]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    outs = llm.embed(prompts, lora_request=[_lora(n, adapters) for n in names], use_tqdm=False)
    assert len(outs) == len(names)
    for out, name, prompt in zip(outs, names, prompts):
        assert out.prompt_token_ids == llm.get_tokenizer().encode(prompt)
        assert out.finished and out.request_id
        adapter = adapters[name] if name else None
        assert_same(out.outputs.embedding, hf_embedding(base, adapter, out.prompt_token_ids))
        assert len(out.outputs.embedding) == out.outputs.hidden_size == 64
    # the adapters change the embedding (the comparison above is not the base's twice)
    base_vec = torch.tensor(llm.embed(PROMPTS[2], use_tqdm=False)[0].outputs.embedding)
    assert (base_vec - torch.tensor(outs[2].outputs.embedding)).abs().max() > 1e-3


@pytest.mark.parametrize("pooling", ["LAST", "MEAN", "CLS"])
def test_pooling_types_over_chunked_prefill(base, adapters, pooling):
    """A budget of 8 tokens a step: long prompts are pooled over several chunks (MEAN
    over every token's hidden state), under adapters, beside short prompts."""
    llm = _pooling_llm(base, runner="pooling", max_num_batched_tokens=8,
                       override_pooler_config={"pooling_type": pooling})
    long_prompt = " ".join(PROMPTS[:3])
    prompts = [long_prompt, PROMPTS[0], long_prompt, PROMPTS[4]]
    names = ["r8_all", None, None, "r16_rslora"]
    outs = llm.embed(prompts, lora_request=[_lora(n, adapters) for n in names], use_tqdm=False)
    assert len(outs[0].prompt_token_ids) > 3 * 8  # several chunks
    for out, name in zip(outs, names):
        assert_same(out.outputs.embedding, hf_embedding(
            base, adapters[name] if name else None, out.prompt_token_ids, pooling))


def test_normalize_off_and_request_override(base, adapters):
    llm = _pooling_llm(base, task="embed", pooler_config='{"normalize": false}')
    ids = llm.get_tokenizer().encode(PROMPTS[3])
    raw = llm.embed({"prompt_token_ids": ids}, lora_request=_lora("r4_qv", adapters),
                    use_tqdm=False)[0]
    ref = hf_embedding(base, adapters["r4_qv"], ids, normalize=False)
    assert_same(raw.outputs.embedding, ref)
    assert abs(ref.norm().item() - 1.0) > 0.01  # unnormalized indeed
    normed = llm.embed([ids], pooling_params=PoolingParams(normalize=True),
                       lora_request=_lora("r4_qv", adapters), use_tqdm=False)[0]
    assert_same(normed.outputs.embedding, F.normalize(ref, dim=-1))


def test_truncate_prompt_tokens_keeps_the_last(base, adapters):
    llm = _pooling_llm(base, runner="pooling")
    ids = llm.get_tokenizer().encode(PROMPTS[4])
    out = llm.embed([PROMPTS[4]], truncate_prompt_tokens=5,
                    lora_request=_lora("r8_all", adapters), use_tqdm=False)[0]
    assert out.prompt_token_ids == ids[-5:]
    assert_same(out.outputs.embedding, hf_embedding(base, adapters["r8_all"], ids[-5:]))
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        PoolingParams(truncate_prompt_tokens=0)


def test_encode_returns_tensors(base):
    llm = LLM(str(base), convert="embed", max_model_len=256)
    outs = llm.encode(PROMPTS[:2], use_tqdm=False)
    for out in outs:
        assert isinstance(out.outputs.data, torch.Tensor)
        assert_same(out.outputs.data, hf_embedding(base, None, out.prompt_token_ids))


def test_generate_and_embed_refused_on_the_other_runner(base):
    pooling = LLM(str(base), runner="pooling", max_model_len=256)
    with pytest.raises(ValueError, match="only supported for generative models"):
        pooling.generate(PROMPTS[0])
    with pytest.raises(ValueError, match="only supported for generative models"):
        pooling.llm_engine.add_request("x", PROMPTS[0], SamplingParams())
    generate = LLM(str(base), max_model_len=256)
    with pytest.raises(ValueError, match="only supported for pooling models"):
        generate.embed(PROMPTS[0])
    with pytest.raises(ValueError, match="disagree"):
        LLM(str(base), runner="generate", task="embed")
    with pytest.raises(ValueError, match="pooling_type"):
        LLM(str(base), runner="pooling", pooler_config={"pooling_type": "MAX"})


# ---- checkpoints ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def headless(base, tmp_path_factory) -> Path:
    """The base saved as a `Qwen2Model` (AutoModel's: no lm_head, names without model.)."""
    out = tmp_path_factory.mktemp("headless") / "model"
    shutil.copytree(base, out)
    for f in [*out.glob("*.safetensors"), *out.glob("*.bin"), *out.glob("*.index.json")]:
        f.unlink()
    load_hf_model(base).model.save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2Model"]
    return out


def test_headless_model_checkpoint_is_an_embedding_model(base, headless, adapters):
    llm = _pooling_llm(headless)  # runner auto: pooling
    assert llm.llm_engine.model_config.runner == "pooling"
    names = [None, "r8_all", "r4_qv"]
    outs = llm.embed(PROMPTS[:3], lora_request=[_lora(n, adapters) for n in names],
                     use_tqdm=False)
    for out, name in zip(outs, names):
        assert_same(out.outputs.embedding, hf_embedding(
            base, adapters[name] if name else None, out.prompt_token_ids))
    with pytest.raises(ValueError, match="no lm_head"):
        LLM(str(headless), runner="generate")


def _headless_adapter(headless: Path, out: Path) -> Path:
    """A PEFT adapter trained over AutoModel (an embedding model's way): its names lack
    the causal LM's `model.` (base_model.model.layers.0.self_attn.q_proj...)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    model = get_peft_model(AutoModel.from_pretrained(str(headless), dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, task_type="FEATURE_EXTRACTION",
                                      target_modules=["q_proj", "v_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(out)
    return out


def test_adapter_trained_over_a_headless_model(headless, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    adapter = _headless_adapter(headless, tmp_path / "headless_adapter")
    llm = _pooling_llm(headless)
    out = llm.embed(PROMPTS[2], lora_request=LoRARequest("h", 9, str(adapter)),
                    use_tqdm=False)[0]
    ref_model = PeftModel.from_pretrained(
        AutoModel.from_pretrained(str(headless), dtype=torch.float32), str(adapter)).eval()
    with torch.no_grad():
        hidden = ref_model(torch.tensor([out.prompt_token_ids])).last_hidden_state[0, -1]
    assert_same(out.outputs.embedding, F.normalize(hidden, dim=-1))
    plain = llm.embed(PROMPTS[2], use_tqdm=False)[0]
    assert (torch.tensor(plain.outputs.embedding)
            - torch.tensor(out.outputs.embedding)).abs().max() > 1e-3


def _sentence_transformers_dir(base: Path, out: Path, mode: str, normalize: bool) -> Path:
    shutil.copytree(base, out)
    modules = [{"idx": 0, "name": "0", "path": "",
                "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    (out / "modules.json").write_text(json.dumps(modules))
    (out / "1_Pooling").mkdir()
    flags = {f"pooling_mode_{m}": m == mode for m in
             ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "lasttoken")}
    (out / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, **flags, "include_prompt": True}))
    return out


def test_sentence_transformers_config_picks_pooling(base, adapters, tmp_path):
    st = _sentence_transformers_dir(base, tmp_path / "st_mean", "mean_tokens", True)
    llm = _pooling_llm(st, runner="pooling")
    pc = llm.llm_engine.model_config.pooler_config
    assert (pc.pooling_type, pc.normalize) == ("MEAN", True)
    outs = llm.embed(PROMPTS[:2], lora_request=[None, _lora("r8_all", adapters)],
                     use_tqdm=False)
    assert_same(outs[0].outputs.embedding,
                hf_embedding(base, None, outs[0].prompt_token_ids, "MEAN"))
    assert_same(outs[1].outputs.embedding,
                hf_embedding(base, adapters["r8_all"], outs[1].prompt_token_ids, "MEAN"))
    # no Normalize module: not normalized; the user's override wins over the files
    st2 = _sentence_transformers_dir(base, tmp_path / "st_cls", "cls_token", False)
    pc2 = LLM(str(st2), runner="pooling", max_model_len=256).llm_engine.model_config
    assert (pc2.pooler_config.pooling_type, pc2.pooler_config.normalize) == ("CLS", False)
    over = LLM(str(st2), runner="pooling", max_model_len=256,
               override_pooler_config={"pooling_type": "LAST"})
    assert over.llm_engine.model_config.pooler_config.pooling_type == "LAST"
    st3 = _sentence_transformers_dir(base, tmp_path / "st_max", "max_tokens", True)
    with pytest.raises(ValueError, match="pooling_mode_max_tokens"):
        LLM(str(st3), runner="pooling", max_model_len=256)


@pytest.fixture(scope="module")
def matryoshka(base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("matryoshka") / "model"
    shutil.copytree(base, out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "is_matryoshka": True}))
    return out


def test_matryoshka_dimensions(base, matryoshka, adapters):
    llm = _pooling_llm(matryoshka, runner="pooling")
    out = llm.embed(PROMPTS[1], pooling_params=PoolingParams(dimensions=16),
                    lora_request=_lora("r16_rslora", adapters), use_tqdm=False)[0]
    assert_same(out.outputs.embedding, hf_embedding(
        base, adapters["r16_rslora"], out.prompt_token_ids, dimensions=16))
    with pytest.raises(ValueError, match="dimensions must be in"):
        llm.embed(PROMPTS[1], pooling_params=PoolingParams(dimensions=65), use_tqdm=False)
    plain = LLM(str(base), runner="pooling", max_model_len=256)
    with pytest.raises(ValueError, match="does not support matryoshka"):
        plain.embed(PROMPTS[1], pooling_params=PoolingParams(dimensions=16), use_tqdm=False)
    assert not plain.llm_engine.has_unfinished_requests()  # the refused call left nothing


# ---- scores (cosine similarity of embeddings) ----------------------------------------------
QUERY = "What is the capital of France?"
DOCS = [PROMPTS[0], "The capital of France is Paris.", PROMPTS[3]]


def hf_cosine(base: Path, adapter: Path | None, a: list[int], b: list[int]) -> float:
    return F.cosine_similarity(hf_embedding(base, adapter, a), hf_embedding(base, adapter, b),
                               dim=0).item()


def test_llm_score_is_the_cosine_of_hf_peft_embeddings(base, adapters):
    """1:N and N:N pairs under an adapter: each score the cosine of HF + PEFT's
    embeddings of the two texts; the pair's ids are the two texts' ids; other shapes are
    refused."""
    llm = _pooling_llm(base, runner="pooling", dtype="float32")
    tok = llm.get_tokenizer()
    lora = _lora("r8_all", adapters)
    one_to_n = llm.score(QUERY, DOCS, lora_request=lora, use_tqdm=False)
    q = tok(QUERY).input_ids
    assert len(one_to_n) == len(DOCS)
    for out, doc in zip(one_to_n, DOCS):
        d = tok(doc).input_ids
        assert out.prompt_token_ids == q + d
        assert out.outputs.score == pytest.approx(hf_cosine(base, adapters["r8_all"], q, d),
                                                  abs=1e-5)
    pairs = llm.score(DOCS[:2], [QUERY, DOCS[2]], use_tqdm=False)
    for out, (a, b) in zip(pairs, [(DOCS[0], QUERY), (DOCS[1], DOCS[2])], strict=True):
        assert out.outputs.score == pytest.approx(
            hf_cosine(base, None, tok(a).input_ids, tok(b).input_ids), abs=1e-5)
    with pytest.raises(ValueError, match="1:1, 1:N or N:N"):
        llm.score(DOCS[:2], DOCS)


# ---- the server ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(matryoshka, adapters):
    modules = [f"{n}={adapters[n]}" for n in ("r4_qv", "r8_all")]
    with RemoteServer(matryoshka, ["--runner", "pooling", "--served-model-name", "emb",
                                   "--enable-lora", "--max-loras", "1", "--max-lora-rank",
                                   "16", "--max-cpu-loras", "4", "--max-model-len", "128",
                                   "--max-num-batched-tokens", "16", "--dtype", "float32",
                                   "--lora-modules", *modules],
                      env={"LORAPLEX_ALLOW_RUNTIME_LORA_UPDATING": "True"}) as srv:
        yield srv


def _floats(b64: str) -> list[float]:
    raw = base64.b64decode(b64)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def test_server_embeddings_per_adapter(server, base, adapters):
    client = server.get_client()
    texts = [PROMPTS[0], " ".join(PROMPTS[1:3])]  # the second is chunked (16 a step)
    for model, adapter in (("emb", None), ("r4_qv", adapters["r4_qv"]),
                           ("r8_all", adapters["r8_all"])):
        res = client.embeddings.create(model=model, input=texts, encoding_format="float")
        assert res.model == model and res.object == "list"
        ids = [server_tokens(server, t) for t in texts]
        assert res.usage.prompt_tokens == res.usage.total_tokens == sum(map(len, ids))
        for i, d in enumerate(res.data):
            assert d.index == i and d.object == "embedding"
            assert_same(d.embedding, hf_embedding(base, adapter, ids[i]))
        # the openai client's default: base64, decoded by the client as float32
        default = client.embeddings.create(model=model, input=texts)
        for d, f in zip(default.data, res.data):
            assert_same(d.embedding, torch.tensor(f.embedding))


def server_tokens(server, text: str) -> list[int]:
    r = server.post("/tokenize", {"prompt": text})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_server_token_input_base64_and_dimensions(server, base, adapters):
    ids = [server_tokens(server, p) for p in PROMPTS[2:4]]
    r = server.post("/v1/embeddings", {"model": "r8_all", "input": ids,
                                       "encoding_format": "base64", "dimensions": 8,
                                       "user": "someone"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["prompt_tokens"] == sum(map(len, ids))
    for d, one in zip(body["data"], ids):
        assert_same(_floats(d["embedding"]),
                    hf_embedding(base, adapters["r8_all"], one, dimensions=8))
    single = server.post("/v1/embeddings", {"model": "emb", "input": ids[0]}).json()
    assert len(single["data"]) == 1
    assert_same(single["data"][0]["embedding"], hf_embedding(base, None, ids[0]))


def test_server_chat_style_embeddings(server, base, adapters):
    """vLLM's `messages` (one conversation, the chat template's rendering, no generation
    prompt, no special tokens added): the embedding of the ids /tokenize renders for it,
    under the adapter; HF + PEFT's on them."""
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": PROMPTS[1]}]
    r = server.post("/tokenize", {"model": "r4_qv", "messages": messages,
                                  "add_generation_prompt": False})
    assert r.status_code == 200, r.text
    ids = r.json()["tokens"]
    r = server.post("/v1/embeddings", {"model": "r4_qv", "messages": messages})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["data"]) == 1 and body["usage"]["prompt_tokens"] == len(ids)
    assert_same(body["data"][0]["embedding"], hf_embedding(base, adapters["r4_qv"], ids))
    with_prompt = server.post("/v1/embeddings", {"model": "r4_qv", "messages": messages,
                                                 "add_generation_prompt": True}).json()
    assert with_prompt["usage"]["prompt_tokens"] > len(ids)


def test_server_score_and_rerank(server, base, adapters):
    """/score (and /v1/score) 1:N and N:N, /rerank (/v1/rerank, /v2/rerank) sorted by
    relevance and cut at top_n: HF + PEFT's cosines under the adapter; bad shapes fail
    alone."""
    ids = {t: server_tokens(server, t) for t in [QUERY, *DOCS]}
    want = [hf_cosine(base, adapters["r4_qv"], ids[QUERY], ids[d]) for d in DOCS]
    r = server.post("/score", {"model": "r4_qv", "text_1": QUERY, "text_2": DOCS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "r4_qv"
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert [d["score"] for d in body["data"]] == pytest.approx(want, abs=1e-5)
    assert body["usage"]["prompt_tokens"] == len(ids[QUERY]) + sum(len(ids[d]) for d in DOCS)
    pairs = server.post("/v1/score", {"model": "emb", "text_1": DOCS[:2],
                                      "text_2": [QUERY, DOCS[2]]}).json()
    assert [d["score"] for d in pairs["data"]] == pytest.approx(
        [hf_cosine(base, None, ids[DOCS[0]], ids[QUERY]),
         hf_cosine(base, None, ids[DOCS[1]], ids[DOCS[2]])], abs=1e-5)
    order = sorted(range(len(DOCS)), key=lambda i: -want[i])
    for route, top_n in (("/rerank", 2), ("/v1/rerank", 0), ("/v2/rerank", 10)):
        r = server.post(route, {"model": "r4_qv", "query": QUERY, "documents": DOCS,
                                "top_n": top_n})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["index"] for x in results] == order[:top_n or len(DOCS)]
        assert [x["document"]["text"] for x in results] == [DOCS[i] for i in
                                                             order[:top_n or len(DOCS)]]
        assert [x["relevance_score"] for x in results] == pytest.approx(
            [want[i] for i in order[:top_n or len(DOCS)]], abs=1e-5)
    for route, bad, status, param in [
            ("/score", {"text_1": DOCS[:2], "text_2": DOCS}, 400, "text_1"),
            ("/score", {"text_1": [], "text_2": DOCS}, 400, "text_1"),
            ("/rerank", {"query": QUERY, "documents": []}, 400, "documents"),
            ("/rerank", {"query": QUERY, "documents": DOCS, "top_n": -1}, 400, "top_n"),
            ("/score", {"model": "nope", "text_1": "a", "text_2": "b"}, 404, "model")]:
        r = server.post(route, {"model": "emb", **bad})
        assert r.status_code == status, (route, bad, r.text)
        assert r.json()["error"]["param"] == param, r.text
    assert server.post("/score", {"text_1": "a", "text_2": "b"}).status_code == 200


@pytest.mark.parametrize("body,status,param", [
    ({"model": "emb", "input": "hi", "messages": [{"role": "user", "content": "hi"}]},
     400, "input"),
    ({"model": "emb"}, 400, "input"),
    ({"model": "emb", "messages": [{"role": "user", "content": "hi"}],
      "chat_template": "{{ raise_exception('no') }}"}, 400, "messages"),
    ({"model": "nope", "input": "hi"}, 404, "model"),
    ({"model": "emb", "input": []}, 400, "input"),
    ({"model": "emb", "input": [[]]}, 400, "input"),
    ({"model": "emb", "input": [1, 2, 10**6]}, 400, "input"),
    ({"model": "emb", "input": [[1, 2], [-1]]}, 400, "input"),
    ({"model": "emb", "input": " ".join(PROMPTS * 3)}, 400, "input"),
    ({"model": "emb", "input": "hi", "dimensions": 65}, 400, "dimensions"),
    ({"model": "emb", "input": "hi", "dimensions": 0}, 400, "dimensions"),
    ({"model": "emb", "input": "hi", "encoding_format": "int8"}, 400, None),
    ({"model": "emb", "input": "hi", "truncate_prompt_tokens": 0}, 400,
     "truncate_prompt_tokens"),
])
def test_server_bad_requests_fail_alone(server, body, status, param):
    r = server.post("/v1/embeddings", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and err["message"]
    if param is not None:
        assert err["param"] == param, err
    ok = server.post("/v1/embeddings", {"model": "r4_qv", "input": ["still", "serving"]})
    assert ok.status_code == 200 and len(ok.json()["data"]) == 2


def test_server_truncates_long_inputs_when_asked(server, base):
    text = " ".join(PROMPTS * 3)  # past max_model_len (128): a 400 without truncation
    ids = server_tokens(server, text)
    assert len(ids) > 128
    r = server.post("/v1/embeddings", {"model": "emb", "input": text,
                                       "truncate_prompt_tokens": 20})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 20
    assert_same(r.json()["data"][0]["embedding"], hf_embedding(base, None, ids[-20:]))


def test_server_generation_routes_refused(server):
    for path, body in (("/v1/completions", {"model": "emb", "prompt": "hi"}),
                       ("/v1/chat/completions",
                        {"model": "emb", "messages": [{"role": "user", "content": "hi"}]})):
        r = server.post(path, body)
        assert r.status_code == 404, r.text
        assert "does not support" in r.json()["error"]["message"]
    assert server.post("/v1/embeddings", {"model": "emb", "input": "ok"}).status_code == 200
    # SageMaker's one route: an embedding request by its `input`
    r = server.post("/invocations", {"model": "r4_qv", "input": ["a", "b"]})
    assert r.status_code == 200 and len(r.json()["data"]) == 2, r.text
    r = server.post("/invocations", {"model": "emb", "prompt": "hi"})
    assert r.status_code == 404 and "does not support Completions" in r.text


def test_server_models_dynamic_adapter_and_metrics(server, base, adapters):
    ids = {m["id"] for m in server.get("/v1/models").json()["data"]}
    assert {"emb", "r4_qv", "r8_all"} <= ids
    r = server.post("/v1/load_lora_adapter", {"lora_name": "dyn",
                                              "lora_path": str(adapters["r16_rslora"])})
    assert r.status_code == 200, r.text
    toks = server_tokens(server, PROMPTS[-1])
    res = server.get_client().embeddings.create(model="dyn", input=PROMPTS[-1])
    assert_same(res.data[0].embedding, hf_embedding(base, adapters["r16_rslora"], toks))
    metrics = server.get("/metrics").text
    line = next(ln for ln in metrics.splitlines()
                if ln.startswith("loraplex:prompt_tokens_total") and 'model_name="dyn"' in ln)
    assert float(line.rsplit(" ", 1)[1]) == len(toks)


def test_embeddings_route_refused_on_a_generate_server(base):
    with RemoteServer(base, ["--max-model-len", "128", "--dtype", "float32"]) as srv:
        r = srv.post("/v1/embeddings", {"input": "hi"})
        assert r.status_code == 404, r.text
        assert "does not support Embeddings" in r.json()["error"]["message"]
        for route, body, api in (("/score", {"text_1": "a", "text_2": "b"}, "Score"),
                                 ("/rerank", {"query": "a", "documents": ["b"]}, "Rerank")):
            r = srv.post(route, body)
            assert r.status_code == 404 and f"does not support {api}" in r.text, r.text
        ok = srv.post("/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200, ok.text
