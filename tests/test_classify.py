"""Sequence classification (vLLM's classify) with a LoRA adapter per request, against
HF's AutoModelForSequenceClassification + PEFT.

The base: a tiny Qwen2ForSequenceClassification (3 labels, pad_token_id set). Adapters:
PEFT SEQ_CLS LoRA, two with their own trained head (modules_to_save score, randomized
here as training would change it), one whose head was left out (the base's applies).
The reference: each prompt alone in fp32, softmax of the logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex import LLM, LoRARequest, PoolingParams
from tests.fixtures import SAMPLE_SENTENCES
from tests.server_utils import RemoteServer

PROMPTS = list(SAMPLE_SENTENCES[:6])
LABELS = {0: "neg", 1: "neu", 2: "pos"}
ADAPTERS = ("r4_qv_head", "r8_all_head", "r4_nohead")


@pytest.fixture(scope="module")
def base(tiny_models, tmp_path_factory) -> Path:
    """The tiny qwen2's decoder weights and tokenizer, with a random score head."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    src = tiny_models["qwen2"]
    out = tmp_path_factory.mktemp("classifier")
    cfg = AutoConfig.from_pretrained(src)
    cfg.architectures = ["Qwen2ForSequenceClassification"]
    cfg.num_labels, cfg.id2label = 3, LABELS
    cfg.label2id = {v: k for k, v in LABELS.items()}
    cfg.pad_token_id = 0
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32)
    model.model.load_state_dict({k[len("model."):]: v for k, v in load_file(
        str(src / "model.safetensors")).items() if k.startswith("model.")})
    with torch.no_grad():
        model.score.weight.normal_(0, 0.5)
    model.save_pretrained(out)
    for f in src.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("cls_adapters")
    out = {}
    for i, (name, r, targets) in enumerate((("r4_qv_head", 4, ["q_proj", "v_proj"]),
                                            ("r8_all_head", 8, "all-linear"),
                                            ("r4_nohead", 4, ["q_proj", "v_proj"]))):
        torch.manual_seed(10 + i)
        model = get_peft_model(
            AutoModelForSequenceClassification.from_pretrained(base, dtype=torch.float32),
            LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=2 * r, target_modules=targets))
        with torch.no_grad():  # as trained: B nonzero, the head changed
            for n, p in model.named_parameters():
                if "lora_B" in n or "modules_to_save" in n:
                    p.normal_(0, 0.3)
        model.save_pretrained(root / name)
        out[name] = root / name
    # no head of its own: the base's applies (modules_to_save left out)
    path = out["r4_nohead"]
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


_HF: dict = {}


@torch.no_grad()
def hf_probs(base: Path, adapter: Path | None, ids: list[int]) -> torch.Tensor:
    """HF (+ PEFT)'s class probabilities for one unpadded prompt, fp32."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    key = (str(base), str(adapter))
    if key not in _HF:
        model = AutoModelForSequenceClassification.from_pretrained(base, dtype=torch.float32)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, str(adapter))
        _HF[key] = model.eval()
    logits = _HF[key](torch.tensor([ids])).logits[0].float()
    return torch.softmax(logits, -1)


def assert_probs(got: list[float], ref: torch.Tensor) -> None:
    got_t = torch.tensor(got, dtype=torch.float32)
    assert got_t.shape == ref.shape
    assert (got_t - ref).abs().max().item() < 1e-5, (got_t, ref)


def test_heads_differ(base, adapters):
    """The fixtures make the mutation checks bite: the adapters' heads differ from the
    base's, and the adapter without a head saved none."""
    base_w = load_file(str(base / "model.safetensors"))["score.weight"]
    for name in ("r4_qv_head", "r8_all_head"):
        w = load_file(str(adapters[name] / "adapter_model.safetensors"))
        head = next(v for k, v in w.items() if "score" in k)
        assert head.shape == base_w.shape and not torch.allclose(head, base_w)
    assert not any("score" in k for k in load_file(
        str(adapters["r4_nohead"] / "adapter_model.safetensors")))


def test_mixed_batch_matches_hf_peft(base, adapters):
    """One classify call: the base and three adapters (max_loras=2), each prompt equal to
    HF + PEFT with its adapter alone; each adapter's own head, else the base's."""
    llm = LLM(str(base), runner="pooling", enable_lora=True, max_loras=2, max_lora_rank=8,
              max_cpu_loras=4, max_model_len=128, dtype="float32")
    assert llm.llm_engine.model_config.pooling_task == "classify"
    names = [None, "r4_qv_head", "r8_all_head", "r4_nohead", "r8_all_head", None,
             "r4_nohead", "r4_qv_head"]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    outs = llm.classify(prompts, lora_request=[_lora(n, adapters) for n in names],
                        use_tqdm=False)
    for out, name in zip(outs, names, strict=True):
        assert out.outputs.num_classes == 3
        assert abs(sum(out.outputs.probs) - 1) < 1e-5
        assert_probs(out.outputs.probs, hf_probs(base, adapters.get(name),
                                                 out.prompt_token_ids))
    with pytest.raises(ValueError, match="not supported by this model"):
        llm.embed("hi")
    for bad, match in ((PoolingParams(normalize=True), "normalize"),
                       (PoolingParams(dimensions=2), "matryoshka")):
        with pytest.raises(ValueError, match=match):
            llm.classify(PROMPTS[0], pooling_params=bad, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_classify_refused_on_an_embedding_model(tiny_models):
    llm = LLM(str(tiny_models["qwen2"]), runner="pooling", max_model_len=64)
    with pytest.raises(ValueError, match="not supported by this model"):
        llm.classify("hi")
    with pytest.raises(ValueError, match="ForSequenceClassification"):
        LLM(str(tiny_models["qwen2"]), convert="classify", max_model_len=64)


# ---- POST /classify ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(base, adapters):
    modules = [f"{n}={adapters[n]}" for n in ADAPTERS]
    with RemoteServer(base, ["--served-model-name", "cls", "--enable-lora", "--max-loras",
                             "1", "--max-lora-rank", "8", "--max-cpu-loras", "4",
                             "--max-model-len", "128", "--dtype", "float32",
                             "--lora-modules", *modules]) as srv:
        yield srv


def _tokens(server, text: str) -> list[int]:
    r = server.post("/tokenize", {"prompt": text})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_server_classify_per_adapter(server, base, adapters):
    texts = PROMPTS[:3]
    ids = [_tokens(server, t) for t in texts]
    for model in ("cls", *ADAPTERS):
        r = server.post("/classify", {"model": model, "input": texts})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and body["model"] == model
        assert body["id"] and body["created"]
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == sum(
            map(len, ids))
        for i, d in enumerate(body["data"]):
            ref = hf_probs(base, adapters.get(model), ids[i])
            assert d["index"] == i and d["num_classes"] == 3
            assert d["label"] == LABELS[int(ref.argmax())]
            assert_probs(d["probs"], ref)
    # token ids, one input
    r = server.post("/v1/classify", {"model": "r8_all_head", "input": ids[1]})
    assert r.status_code == 200, r.text
    assert_probs(r.json()["data"][0]["probs"], hf_probs(base, adapters["r8_all_head"], ids[1]))


@pytest.mark.parametrize("body,status", [
    ({"model": "nope", "input": "hi"}, 404),
    ({"model": "cls", "input": []}, 400),
    ({"model": "cls", "input": [[]]}, 400),
    ({"model": "cls", "input": [1, 2, 10**6]}, 400),
    ({"model": "cls", "input": " ".join(PROMPTS * 3)}, 400),
    ({"model": "cls"}, 400),
])
def test_server_bad_requests_fail_alone(server, body, status):
    r = server.post("/classify", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and err["message"]
    ok = server.post("/classify", {"model": "r4_qv_head", "input": ["still", "serving"]})
    assert ok.status_code == 200 and len(ok.json()["data"]) == 2


def test_server_embeddings_refused_on_a_classifier(server):
    """No embeddings, and no scores from a classifier of 3 labels (a cross-encoder has
    one: tests/test_cross_encoder.py), as vLLM's 404."""
    r = server.post("/v1/embeddings", {"model": "cls", "input": "hi"})
    assert r.status_code == 404 and "does not support Embeddings" in r.text, r.text
    for route, body in (("/score", {"model": "cls", "text_1": "a", "text_2": "b"}),
                        ("/v1/rerank", {"model": "cls", "query": "a", "documents": ["b"]})):
        r = server.post(route, body)
        assert r.status_code == 404 and "num_labels == 1" in r.text, r.text


def test_classify_route_refused_on_other_servers(tiny_models):
    with RemoteServer(tiny_models["qwen2"], ["--max-model-len", "64"]) as srv:
        r = srv.post("/classify", {"input": "hi"})
        assert r.status_code == 404, r.text
        assert "does not support Classification" in r.json()["error"]["message"]


def test_task_embed_serves_a_classifiers_hidden_states(base):
    """task="embed" on a classifier: its pooled last hidden state (normalized), the head
    unused; classify refused then."""
    import torch.nn.functional as F
    from transformers import AutoModelForSequenceClassification

    llm = LLM(str(base), task="embed", max_model_len=64, dtype="float32")
    out = llm.embed(PROMPTS[0], use_tqdm=False)[0]
    hf = AutoModelForSequenceClassification.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        hidden = hf.model(torch.tensor([out.prompt_token_ids])).last_hidden_state[0, -1]
    ref = F.normalize(hidden, dim=-1)
    assert (torch.tensor(out.outputs.embedding) - ref).abs().max().item() < 2e-5
    with pytest.raises(ValueError, match="not supported by this model"):
        llm.classify("hi")


def test_trailing_pad_tokens_and_a_bad_head_fail_alone(base, adapters, tmp_path):
    """A prompt ending in pad_token_id is scored at its last non-pad token, as HF's
    (over chunked prefill too); an adapter whose head has another shape fails its own
    request, the others still classified."""
    bad = tmp_path / "bad_head"
    shutil.copytree(adapters["r4_qv_head"], bad)
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = next(k for k in tensors if "score" in k)
    tensors[key] = torch.randn(5, tensors[key].shape[1])
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    llm = LLM(str(base), runner="pooling", enable_lora=True, max_loras=2, max_lora_rank=8,
              max_model_len=128, max_num_batched_tokens=8, dtype="float32")
    ids = llm.get_tokenizer().encode(PROMPTS[3])
    assert 0 not in ids[1:]
    padded = {"prompt_token_ids": ids + [0, 0, 0]}  # pad_token_id=0
    outs = llm.classify([padded, padded], use_tqdm=False,
                        lora_request=[None, _lora("r8_all_head", adapters)])
    assert_probs(outs[0].outputs.probs, hf_probs(base, None, padded["prompt_token_ids"]))
    assert_probs(outs[1].outputs.probs, hf_probs(base, adapters["r8_all_head"],
                                                 padded["prompt_token_ids"]))
    with pytest.raises(ValueError, match="classifier head has shape"):
        llm.classify("hi", lora_request=LoRARequest("bad", 9, str(bad)), use_tqdm=False)
    ok = llm.classify(PROMPTS[0], lora_request=_lora("r4_qv_head", adapters), use_tqdm=False)
    assert ok[0].outputs.num_classes == 3


def test_run_batch_classify_lines(base, adapters, tmp_path):
    """`loraplex run-batch` on a classifier: /classify lines under the base and an
    adapter with its own head, HF + PEFT's probabilities; an embeddings line there fails
    alone (404)."""
    from transformers import AutoTokenizer

    from loraplex.entrypoints.cli import main

    ids = AutoTokenizer.from_pretrained(str(base))(PROMPTS[1]).input_ids
    lines = [json.dumps({"custom_id": f"c-{m}", "method": "POST", "url": "/v1/classify",
                         "body": {"model": m, "input": [ids]}})
             for m in ("clf", "r8_all_head")]
    lines.append(json.dumps({"custom_id": "emb", "method": "POST", "url": "/v1/embeddings",
                             "body": {"model": "clf", "input": "hi"}}))
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines))
    assert main(["run-batch", "--model", str(base), "-i", str(inp), "-o", str(out),
                 "--served-model-name", "clf", "--runner", "pooling", "--enable-lora",
                 "--max-lora-rank", "16", "--dtype", "float32", "--max-model-len", "128",
                 "--lora-modules", f"r8_all_head={adapters['r8_all_head']}"]) == 0
    results = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    for model, adapter in (("clf", None), ("r8_all_head", adapters["r8_all_head"])):
        data = results[f"c-{model}"]["response"]["body"]["data"]
        assert_probs(data[0]["probs"], hf_probs(base, adapter, ids))
    assert results["emb"]["response"]["status_code"] == 404
