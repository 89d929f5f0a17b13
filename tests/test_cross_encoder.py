"""Cross-encoder scoring (vLLM's): a one-label `*ForSequenceClassification` checkpoint
scores each (text_1, text_2) pair run through it as ONE input, its logit through the
score activation (sigmoid); a causal LM served as a reranker through `hf_overrides`
(the Qwen3-Reranker recipe: the head sigmoid(h.(W_yes - W_no)) from lm_head rows). Each
request under its LoRA adapter, against HF transformers + PEFT in fp32.

The pair input (vLLM's get_score_prompt): tokenizer(text_1, text_pair=text_2) for a
cross-encoder (this tokenizer's pair template puts <s> before each text), the two texts
concatenated for a converted LM (use_pad_token false).
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex import LLM, LoRARequest
from tests.fixtures import add_tokens_to_model, edited_copy, make_tiny_model
from tests.server_utils import RemoteServer, clean_env

QUERIES = ["What is the capital of France?", "Who wrote about the sea?"]
DOCS = ["The capital of France is Paris, a city famous for its art.",
        "Please write a short poem about the ocean and the stars.",
        "Water boils at one hundred degrees Celsius at sea level.",
        "She sells sea shells by the sea shore<pad><pad>"]  # ends in pad_token_id (3)
ADAPTERS = ("r4_qv_head", "r8_all_nohead", "r2_o_head")
QWEN3_RERANKER = {"architectures": ["Qwen3ForSequenceClassification"],
                  "classifier_from_token": ["no", "yes"], "is_original_qwen3_reranker": True}
PREFIX = "<|system|>Judge whether the Document meets the Query. Answer yes or no.\n<|user|>"
SUFFIX = "\n<|assistant|>"


def _cross_encoder(src: Path, out: Path, arch: str, num_labels: int = 1) -> Path:
    """The tiny causal LM's decoder and tokenizer as a `arch` classifier with a random
    head of `num_labels` (logits of order 1, so the sigmoid is far from flat)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = AutoConfig.from_pretrained(src)
    cfg.architectures = [arch]
    cfg.num_labels = num_labels
    cfg.pad_token_id = 3  # <pad>
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32)
    model.model.load_state_dict({k[len("model."):]: v for k, v in load_file(
        str(src / "model.safetensors")).items() if k.startswith("model.")})
    with torch.no_grad():
        model.score.weight.normal_(0, 0.15)
    model.save_pretrained(out)
    for f in src.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def base(tiny_models, tmp_path_factory) -> Path:
    return _cross_encoder(tiny_models["qwen3"], tmp_path_factory.mktemp("xenc"),
                          "Qwen3ForSequenceClassification")


@pytest.fixture(scope="module")
def llama_base(tiny_models, tmp_path_factory) -> Path:
    return _cross_encoder(tiny_models["llama"], tmp_path_factory.mktemp("xenc_llama"),
                          "LlamaForSequenceClassification")


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory) -> dict[str, Path]:
    """PEFT SEQ_CLS adapters of different ranks; two with their own trained head."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("xenc_adapters")
    out = {}
    for i, (name, r, targets) in enumerate((("r4_qv_head", 4, ["q_proj", "v_proj"]),
                                            ("r8_all_nohead", 8, "all-linear"),
                                            ("r2_o_head", 2, ["o_proj", "down_proj"]))):
        torch.manual_seed(20 + i)
        model = get_peft_model(
            AutoModelForSequenceClassification.from_pretrained(base, dtype=torch.float32),
            LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=2 * r, target_modules=targets))
        with torch.no_grad():  # as trained: B nonzero, the head changed
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.2)
                elif "modules_to_save" in n:
                    p.normal_(0, 0.15)
        model.save_pretrained(root / name)
        out[name] = root / name
    path = out["r8_all_nohead"]  # its head left out: the base's applies
    tensors = load_file(str(path / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if "score" not in k},
              str(path / "adapter_model.safetensors"))
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["modules_to_save"], cfg["task_type"] = None, None  # PEFT would add score back
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def _lora(name: str | None, adapters: dict[str, Path]) -> LoRARequest | None:
    return None if name is None else LoRARequest(name, ADAPTERS.index(name) + 1,
                                                 str(adapters[name]))


def _tok(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def pair_ids(path: Path, q: str, d: str, max_length: int | None = None) -> list[int]:
    """The cross-encoder's pair input, as vLLM makes it: the tokenizer's pair encoding."""
    kw = {"truncation": True, "max_length": max_length} if max_length else {}
    return _tok(path)(q, text_pair=d, **kw)["input_ids"]


_HF: dict = {}


def _hf(path: Path, adapter: Path | None, causal: bool = False):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    key = (str(path), str(adapter), causal)
    if key not in _HF:
        cls = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
        model = cls.from_pretrained(path, dtype=torch.float32)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, str(adapter))
        _HF[key] = model.eval()
    return _HF[key]


@torch.no_grad()
def hf_score(path: Path, adapter: Path | None, ids: list[int]) -> float:
    """HF (+ PEFT)'s sigmoid of the one logit (at the last non-pad token, HF's rule)."""
    logits = _hf(path, adapter)(torch.tensor([ids])).logits[0].float()
    assert logits.shape == (1,)
    return torch.sigmoid(logits)[0].item()


def assert_close(got: float, ref: float) -> None:
    assert abs(got - ref) < 1e-5, (got, ref)


def test_llm_score_mixed_adapters_matches_hf_peft(base, adapters):
    """LLM.score 1:N and N:N with one adapter per pair (base + three adapters over
    max_loras=2), each the HF + PEFT classifier's sigmoid on the pair's one input; a
    document ending in pad tokens scored at its last non-pad token; classify on the
    cross-encoder gives the same sigmoid."""
    llm = LLM(str(base), runner="pooling", enable_lora=True, max_loras=2, max_lora_rank=8,
              max_cpu_loras=4, max_model_len=128, dtype="float32")
    names = [None, "r4_qv_head", "r8_all_nohead", "r2_o_head"]
    outs = llm.score(QUERIES[0], DOCS, lora_request=[_lora(n, adapters) for n in names],
                     use_tqdm=False)
    scores = []
    for out, doc, name in zip(outs, DOCS, names, strict=True):
        ids = pair_ids(base, QUERIES[0], doc)
        assert out.prompt_token_ids == ids
        assert_close(out.outputs.score, hf_score(base, adapters.get(name), ids))
        scores.append(out.outputs.score)
    assert pair_ids(base, QUERIES[0], DOCS[3])[-2:] == [3, 3]
    assert max(scores) - min(scores) > 0.05 and all(0.02 < s < 0.98 for s in scores)
    # N:N, the adapters in the other order, and the same pairs under one adapter
    names = ["r2_o_head", "r8_all_nohead"]
    outs = llm.score(QUERIES, DOCS[:2], lora_request=[_lora(n, adapters) for n in names],
                     use_tqdm=False)
    for out, q, d, name in zip(outs, QUERIES, DOCS[:2], names, strict=True):
        assert_close(out.outputs.score, hf_score(base, adapters[name], pair_ids(base, q, d)))
    outs = llm.score(QUERIES, DOCS[:2], lora_request=_lora("r4_qv_head", adapters),
                     truncate_prompt_tokens=9, use_tqdm=False)
    for out, q, d in zip(outs, QUERIES, DOCS[:2], strict=True):
        ids = pair_ids(base, q, d, max_length=9)
        assert len(out.prompt_token_ids) == 9 and out.prompt_token_ids == ids
        assert_close(out.outputs.score, hf_score(base, adapters["r4_qv_head"], ids))
    ids = pair_ids(base, QUERIES[1], DOCS[1])
    cls = llm.classify({"prompt_token_ids": ids}, lora_request=_lora("r2_o_head", adapters),
                       use_tqdm=False)[0]
    assert cls.outputs.num_classes == 1
    assert_close(cls.outputs.probs[0], hf_score(base, adapters["r2_o_head"], ids))
    with pytest.raises(ValueError, match="nothing to score"):
        llm.score(QUERIES[0], [], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_pair_input_without_a_pair_template():
    """vLLM hands the pair to the tokenizer as text_pair: with this tokenizer's template
    <s> a <s> b; a tokenizer with no pair template (Qwen's: a ByteLevel post-processor)
    joins the two encodings as they are; an LLM reranker's pair is one joined text."""
    from tokenizers import processors

    from loraplex.scoring import cross_encoder_ids
    from tests.fixtures import load_tokenizer

    tok = load_tokenizer()
    a, b = "What is", " the capital"
    assert cross_encoder_ids(tok, a, b, True, None) == [1, *tok.encode(a)[1:], 1,
                                                        *tok.encode(b)[1:]]
    assert cross_encoder_ids(tok, a, b, False, None) == tok.encode(a + b)
    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    assert cross_encoder_ids(tok, a, b, True, None) == tok.encode(a) + tok.encode(b)
    assert len(cross_encoder_ids(tok, a, b, True, 3)) == 3  # the tokenizer truncates


def test_llama_cross_encoder(llama_base):
    llm = LLM(str(llama_base), max_model_len=128, dtype="float32")
    assert llm.llm_engine.model_config.pooling_task == "classify"
    outs = llm.score(QUERIES, DOCS[:2], use_tqdm=False)
    for out, q, d in zip(outs, QUERIES, DOCS[:2], strict=True):
        assert_close(out.outputs.score, hf_score(llama_base, None, pair_ids(llama_base, q, d)))


def test_activation_settings(base, tmp_path):
    """config.json's sentence-transformers activation (Identity: the raw logit) for
    scores, problem_type regression for classify; a class outside torch.nn.modules is
    refused at start-up."""
    ident = edited_copy(base, tmp_path / "ident", lambda c: c.update(
        sentence_transformers={"activation_fn": "torch.nn.modules.linear.Identity"},
        problem_type="regression"), config="config.json", weights="model.safetensors")
    llm = LLM(str(ident), max_model_len=64, dtype="float32")
    ids = pair_ids(base, QUERIES[0], DOCS[0])
    logit = _hf(base, None)(torch.tensor([ids])).logits[0, 0].item()
    assert_close(llm.score(QUERIES[0], DOCS[0], use_tqdm=False)[0].outputs.score, logit)
    assert_close(llm.classify({"prompt_token_ids": ids}, use_tqdm=False)[0].outputs.probs[0],
                 logit)
    bad = edited_copy(base, tmp_path / "bad", lambda c: c.update(
        sbert_ce_default_activation_function="os.system"), config="config.json",
        weights="model.safetensors")
    with pytest.raises(ValueError, match="torch.nn.modules"):
        LLM(str(bad), max_model_len=64)


def test_score_refused_on_a_classifier_of_several_labels(tiny_models, tmp_path):
    path = _cross_encoder(tiny_models["qwen3"], tmp_path / "three", "Qwen3ForSequenceClassification",
                          num_labels=3)
    llm = LLM(str(path), max_model_len=64, dtype="float32")
    with pytest.raises(ValueError, match="num_labels == 1"):
        llm.score("a", "b", use_tqdm=False)
    assert len(llm.classify("a", use_tqdm=False)[0].outputs.probs) == 3


# ---- the server: /score, /rerank -------------------------------------------------------
@pytest.fixture(scope="module")
def server(base, adapters):
    modules = [f"{n}={adapters[n]}" for n in ADAPTERS]
    with RemoteServer(base, ["--served-model-name", "xenc", "--enable-lora", "--max-loras",
                             "1", "--max-lora-rank", "8", "--max-cpu-loras", "4",
                             "--max-model-len", "128", "--dtype", "float32",
                             "--lora-modules", *modules]) as srv:
        yield srv


def test_server_score_and_rerank_per_adapter(server, base, adapters):
    """Concurrent /score and /rerank calls under the base and every adapter (one slot):
    each pair the HF + PEFT score; rerank's order and top_n; usage = the pairs' tokens."""
    def score(model: str, route: str):
        return model, route, server.post(route, {"model": model, "text_1": QUERIES[0],
                                                  "text_2": DOCS})

    def rerank(model: str, route: str):
        return model, route, server.post(route, {"model": model, "query": QUERIES[1],
                                                  "documents": DOCS, "top_n": 3})

    calls = [(score, m, r) for m in ("xenc", *ADAPTERS) for r in ("/score", "/v1/score")]
    calls += [(rerank, m, r) for m in ("xenc", *ADAPTERS)
              for r in ("/rerank", "/v1/rerank", "/v2/rerank")]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda c: c[0](c[1], c[2]), calls))
    for model, route, r in results:
        assert r.status_code == 200, (route, r.text)
        body = r.json()
        adapter = adapters.get(model)
        if "score" in route:
            ids = [pair_ids(base, QUERIES[0], d) for d in DOCS]
            assert body["model"] == model and body["object"] == "list"
            assert [d["index"] for d in body["data"]] == list(range(len(DOCS)))
            for d, pair in zip(body["data"], ids, strict=True):
                assert_close(d["score"], hf_score(base, adapter, pair))
        else:
            ids = [pair_ids(base, QUERIES[1], d) for d in DOCS]
            ref = [hf_score(base, adapter, pair) for pair in ids]
            order = sorted(range(len(DOCS)), key=lambda i: -ref[i])[:3]
            assert [x["index"] for x in body["results"]] == order
            for x in body["results"]:
                assert x["document"]["text"] == DOCS[x["index"]]
                assert_close(x["relevance_score"], ref[x["index"]])
        assert body["usage"]["total_tokens"] == sum(map(len, ids))


@pytest.mark.parametrize("route,body,status", [
    ("/score", {"model": "xenc", "text_1": "q", "text_2": []}, 400),
    ("/score", {"model": "xenc", "text_1": [], "text_2": ["d"]}, 400),
    ("/score", {"model": "xenc", "text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, 400),
    ("/rerank", {"model": "xenc", "query": "q", "documents": []}, 400),
    ("/rerank", {"model": "xenc", "query": "q", "documents": ["d"], "top_n": -1}, 400),
    ("/score", {"model": "nope", "text_1": "q", "text_2": "d"}, 404),
    ("/score", {"model": "xenc", "text_1": "q", "text_2": " ".join(DOCS * 6)}, 400),
    ("/v1/embeddings", {"model": "xenc", "input": "q"}, 404),
])
def test_server_bad_requests_fail_alone(server, route, body, status):
    r = server.post(route, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and err["message"]
    ok = server.post("/score", {"model": "r4_qv_head", "text_1": "still", "text_2": "up"})
    assert ok.status_code == 200 and len(ok.json()["data"]) == 1


def test_run_batch_score_and_rerank_lines(base, adapters, tmp_path):
    from loraplex.entrypoints.cli import main

    lines = [json.dumps({"custom_id": "s", "method": "POST", "url": "/v1/score",
                         "body": {"model": "r4_qv_head", "text_1": QUERIES[0],
                                  "text_2": DOCS[:2]}}),
             json.dumps({"custom_id": "r", "method": "POST", "url": "/rerank",
                         "body": {"model": "xenc", "query": QUERIES[1],
                                  "documents": DOCS[:3]}})]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines))
    assert main(["run-batch", "--model", str(base), "-i", str(inp), "-o", str(out),
                 "--served-model-name", "xenc", "--enable-lora", "--max-lora-rank", "8",
                 "--dtype", "float32", "--max-model-len", "128",
                 "--lora-modules", f"r4_qv_head={adapters['r4_qv_head']}"]) == 0
    res = {r["custom_id"]: r["response"]["body"]
           for r in map(json.loads, out.read_text().splitlines())}
    for d, doc in zip(res["s"]["data"], DOCS[:2], strict=True):
        assert_close(d["score"], hf_score(base, adapters["r4_qv_head"],
                                          pair_ids(base, QUERIES[0], doc)))
    for x in res["r"]["results"]:
        assert_close(x["relevance_score"], hf_score(
            base, None, pair_ids(base, QUERIES[1], DOCS[x["index"]])))


# ---- a causal LM as a reranker (hf_overrides) -------------------------------------------
@pytest.fixture(scope="module")
def reranker(tmp_path_factory) -> Path:
    """A tiny random Qwen3ForCausalLM whose tokenizer has "yes" and "no" (added after the
    vocabulary, as plain tokens)."""
    path = make_tiny_model(tmp_path_factory.mktemp("reranker"), "qwen3", seed=7,
                           init_std=0.1)
    add_tokens_to_model(path, ["yes", "no"], seed=3)
    return path


@pytest.fixture(scope="module")
def reranker_adapters(reranker, tmp_path_factory) -> dict[str, Path]:
    from tests.fixtures import make_peft_adapter

    root = tmp_path_factory.mktemp("reranker_adapters")
    return {"rr_qv": make_peft_adapter(reranker, root / "rr_qv", r=4, seed=5, scale=0.2),
            "rr_all": make_peft_adapter(reranker, root / "rr_all", r=8, seed=6, scale=0.2,
                                        target_modules="all-linear")}


@torch.no_grad()
def hf_yes_no(path: Path, adapter: Path | None, ids: list[int], tokens=("no", "yes")
              ) -> float:
    """The causal LM's sigmoid(logit_yes - logit_no) at the input's last token."""
    tok = _tok(path)
    logits = _hf(path, adapter, causal=True)(torch.tensor([ids])).logits[0, -1].float()
    no, yes = tok.convert_tokens_to_ids(list(tokens))
    return torch.sigmoid(logits[yes] - logits[no]).item()


def _rr_pair(q: str, d: str) -> tuple[str, str]:
    """Qwen3-Reranker's recipe: the user formats both texts; they are joined as one."""
    return f"{PREFIX}<Query>: {q}\n", f"<Document>: {d}{SUFFIX}"


def test_qwen3_reranker_recipe_matches_the_causal_lm(reranker, reranker_adapters):
    lora = {n: LoRARequest(n, i + 1, str(p)) for i, (n, p) in
            enumerate(reranker_adapters.items())}
    llm = LLM(str(reranker), hf_overrides=QWEN3_RERANKER, enable_lora=True, max_loras=1,
              max_lora_rank=8, max_model_len=256, dtype="float32")
    assert llm.llm_engine.model_config.runner == "pooling"
    q, _ = _rr_pair(QUERIES[0], "")
    docs = [_rr_pair("", d)[1] for d in DOCS]
    names = [None, "rr_qv", "rr_all", "rr_qv"]
    outs = llm.score(q, docs, lora_request=[lora.get(n) for n in names], use_tqdm=False)
    tok = _tok(reranker)
    scores = []
    for out, d, name in zip(outs, docs, names, strict=True):
        ids = tok(q + d)["input_ids"]  # one text: the two concatenated
        assert out.prompt_token_ids == ids
        assert_close(out.outputs.score, hf_yes_no(reranker, reranker_adapters.get(name), ids))
        scores.append(out.outputs.score)
    assert max(scores) - min(scores) > 0.02 and all(0.02 < s < 0.98 for s in scores)
    ids = tok(q + docs[1])["input_ids"]
    cls = llm.classify({"prompt_token_ids": ids}, use_tqdm=False)[0]
    assert cls.outputs.num_classes == 1
    assert_close(cls.outputs.probs[0], hf_yes_no(reranker, None, ids))


def test_reranker_with_tied_embeddings(tmp_path):
    """Qwen3-Reranker-0.6B ties lm_head to the embedding: the head's rows come from it."""
    path = make_tiny_model(tmp_path / "tied", "qwen3", seed=9, init_std=0.1,
                           tie_word_embeddings=True)
    add_tokens_to_model(path, ["yes", "no"], seed=4)
    llm = LLM(str(path), hf_overrides=QWEN3_RERANKER, max_model_len=128, dtype="float32")
    q, d = _rr_pair(QUERIES[0], DOCS[0])
    out = llm.score(q, d, use_tqdm=False)[0]
    assert_close(out.outputs.score, hf_yes_no(path, None, _tok(path)(q + d)["input_ids"]))


def test_one_token_reranker_on_llama(tiny_models):
    """vLLM's no_post_processing with one token on a Llama causal LM: sigmoid of that
    token's logit at the last token (a pad token too: the LM has no padding)."""
    path = tiny_models["llama"]
    llm = LLM(str(path), max_model_len=128, dtype="float32", hf_overrides={
        "architectures": ["LlamaForSequenceClassification"],
        "classifier_from_token": ["no"], "method": "no_post_processing"})
    tok = _tok(path)
    docs = [DOCS[0], DOCS[3]]
    outs = llm.score(QUERIES[0], docs, use_tqdm=False)
    for out, d in zip(outs, docs, strict=True):
        ids = tok(QUERIES[0] + d)["input_ids"]
        with torch.no_grad():
            logits = _hf(path, None, causal=True)(torch.tensor([ids])).logits[0, -1]
        assert_close(out.outputs.score,
                     torch.sigmoid(logits[tok.convert_tokens_to_ids("no")]).item())


def test_reranker_server(reranker, reranker_adapters):
    """`loraplex serve --hf-overrides`: /rerank under an adapter, as the causal LM."""
    q, _ = _rr_pair(QUERIES[1], "")
    docs = [_rr_pair("", d)[1] for d in DOCS[:3]]
    tok = _tok(reranker)
    with RemoteServer(reranker, ["--hf-overrides", json.dumps(QWEN3_RERANKER),
                                 "--enable-lora", "--max-lora-rank", "8", "--max-model-len",
                                 "256", "--dtype", "float32", "--lora-modules",
                                 f"rr_all={reranker_adapters['rr_all']}"]) as srv:
        r = srv.post("/v1/rerank", {"model": "rr_all", "query": q, "documents": docs})
        assert r.status_code == 200, r.text
        ref = [hf_yes_no(reranker, reranker_adapters["rr_all"], tok(q + d)["input_ids"])
               for d in docs]
        results = r.json()["results"]
        assert [x["index"] for x in results] == sorted(range(3), key=lambda i: -ref[i])
        for x in results:
            assert_close(x["relevance_score"], ref[x["index"]])


@pytest.mark.parametrize("overrides,match", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "must be a dict"),
    ({**QWEN3_RERANKER, "classifier_from_token": ["no", "maybe"]}, "not in the tokenizer"),
    ({**QWEN3_RERANKER, "classifier_from_token": ["yes"]}, "two tokens|the false and"),
    ({"architectures": ["Qwen3ForSequenceClassification"],
      "classifier_from_token": ["no", "yes"]}, "needs a method"),
    ({"classifier_from_token": ["no", "yes"], "method": "from_2_way_softmax"},
     "ForSequenceClassification"),
])
def test_bad_overrides_fail_at_start(reranker, overrides, match):
    with pytest.raises(ValueError, match=match):
        LLM(str(reranker), hf_overrides=overrides, max_model_len=64)


def test_bad_overrides_on_the_command_line(reranker):
    """Malformed JSON: a usage error (exit 2); a token not in the vocabulary: a start-up
    error (exit 1) naming it; each one line, no traceback."""
    import subprocess
    import sys

    def serve(overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "loraplex.entrypoints.cli", "serve",
                               str(reranker), "--max-model-len", "64", "--hf-overrides",
                               overrides], capture_output=True, text=True, timeout=120,
                              env=clean_env())

    res = serve("{bad")
    assert res.returncode == 2 and "--hf-overrides" in res.stderr and "JSON" in res.stderr
    res = serve(json.dumps({**QWEN3_RERANKER, "classifier_from_token": ["no", "maybe"]}))
    assert res.returncode == 1, res.stderr
    assert "maybe" in res.stderr and "Traceback" not in res.stderr
