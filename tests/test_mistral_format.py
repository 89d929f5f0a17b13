"""Mistral's own format as the base: `tokenizer_mode` / `config_format` / `load_format`
"mistral" (params.json, consolidated.safetensors, tekken.json), as Mistral's model cards
serve their checkpoints with vLLM.

The reference is HF transformers + PEFT on the HF-format checkpoint the Mistral-format
one was written from (tests/mistral_fixtures.py: Mistral's names, q / k rows in the
interleaved rotary order), fp32: a missed or wrong permutation changes every logit.
Chat prompts must be mistral_common's own encoding of the messages.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraplex import LoRARequest, SamplingParams
from loraplex.sampling_params import StructuredOutputsParams
from tests.engine_utils import GREEDY, check_against_hf, make_llm
from tests.fixtures import make_tiny_model
from tests.server_utils import RemoteServer, clean_env, token_ids_of

pytest.importorskip("mistral_common")

from mistral_common.protocol.instruct.messages import (  # noqa: E402
    AssistantMessage,
    SystemMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest  # noqa: E402
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer  # noqa: E402

from tests.mistral_fixtures import write_mistral_format  # noqa: E402

MISTRAL = dict(tokenizer_mode="mistral", config_format="mistral", load_format="mistral")
ADAPTERS = ("r4_qv", "r8_all")  # ranks 4 and 8 (q/v; every linear)


@pytest.fixture(scope="module")
def mistral_dir(tiny_root: Path, tiny_models) -> Path:
    """The session's tiny HF Mistral in Mistral's format, in a folder of its own."""
    return write_mistral_format(tiny_models["mistral"], tiny_root / "mistral-format")


def test_weights_and_adapters_match_hf(mistral_dir, tiny_models, tiny_adapters, prompts):
    """The consolidated weights serve the HF checkpoint's logits, and PEFT adapters trained
    on the HF model apply unchanged, in one mixed batch (base + ranks 4 and 8)."""
    hf_dir, ad = tiny_models["mistral"], tiny_adapters["mistral"]
    llm = make_llm(mistral_dir, enable_lora=True, max_loras=2, max_lora_rank=8, **MISTRAL)
    loras = [None, *(LoRARequest(n, i + 1, str(ad[n])) for i, n in enumerate(ADAPTERS))]
    jobs = [(p, loras[i % 3]) for i, p in enumerate(prompts[:3] * 2)]
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in jobs], GREEDY,
                        lora_request=[lora for _, lora in jobs], use_tqdm=False)
    check_against_hf(outs, hf_dir, [None if lo is None else ad[lo.lora_name] for _, lo in jobs],
                     [p for p, _ in jobs])


def test_yarn_params_match_hf(tiny_root, prompts):
    """params.json's yarn block (beta / alpha) as HF's yarn rope_parameters: the logits
    of an HF Mistral with that rope scaling."""
    hf_dir = make_tiny_model(tiny_root / "mistral-yarn-hf", "mistral", seed=5, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
        "beta_fast": 16.0, "beta_slow": 2.0})
    ours = write_mistral_format(hf_dir, tiny_root / "mistral-yarn")
    assert "yarn" in json.loads((ours / "params.json").read_text())
    llm = make_llm(ours, **MISTRAL)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[2:4]], GREEDY,
                        use_tqdm=False)
    check_against_hf(outs, hf_dir, [None, None], prompts[2:4])


def test_auto_detects_mistral_format_beside_hf_files(mistral_dir, tiny_models, tmp_path,
                                                     prompts, caplog):
    """A repo holding both formats (Mistral-7B-Instruct-v0.3's layout): "auto" reads
    params.json, the consolidated weights and tekken.json, as vLLM does, and the logits
    are the HF-format model's own."""
    both = tmp_path / "both"
    shutil.copytree(tiny_models["mistral"], both)
    for f in mistral_dir.iterdir():
        shutil.copy(f, both / f.name)
    (both / "model.safetensors").unlink()  # the HF weights gone: only consolidated load
    llm = make_llm(both)
    engine = llm.llm_engine
    assert engine.mistral_format.config and engine.mistral_format.weights
    assert engine.tokenizer_mode == "mistral" and engine.tokenizer.is_mistral
    hf = make_llm(tiny_models["mistral"])
    shutil.copy(tiny_models["mistral"] / "model.safetensors", both)  # both formats' weights
    with caplog.at_level(logging.WARNING, logger="loraplex.models.loader"):
        hf_weights = make_llm(both, config_format="hf", load_format="safetensors")
    assert not hf_weights.llm_engine.mistral_format.weights
    assert "ignoring checkpoint tensor" not in caplog.text  # consolidated ones not read
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=5)
    for ours, theirs, again in zip(*(m.generate([{"prompt_token_ids": p} for p in prompts[:2]],
                                                params, use_tqdm=False)
                                     for m in (llm, hf, hf_weights)), strict=True):
        assert again.outputs[0].token_ids == theirs.outputs[0].token_ids
        assert ours.outputs[0].token_ids == theirs.outputs[0].token_ids
        for a, b in zip(ours.outputs[0].logprobs, theirs.outputs[0].logprobs, strict=True):
            assert a.keys() == b.keys()
            assert all(abs(a[t].logprob - b[t].logprob) < 1e-5 for t in a)


def test_chat_is_mistral_commons_encoding(mistral_dir, tiny_models):
    """LLM.chat's prompt ids are mistral_common's own encoding of the messages; the text
    round-trips through the tokenizer; a chat template is refused."""
    llm = make_llm(mistral_dir, **MISTRAL)
    reference = MistralTokenizer.from_file(str(mistral_dir / "tekken.json"))
    want = reference.encode_chat_completion(ChatCompletionRequest(messages=[
        SystemMessage(content="Answer briefly."), UserMessage(content="Hi"),
        AssistantMessage(content="Hello there."),
        UserMessage(content="What is the capital of France?")])).tokens
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello there."},
                {"role": "user", "content": [{"type": "text",
                                              "text": "What is the capital of France?"}]}]
    out = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                   use_tqdm=False)[0]
    assert out.prompt_token_ids == want
    tok = llm.get_tokenizer()
    assert tok.apply_chat_template(messages) == want  # HF's call, for users
    assert tok.apply_chat_template(messages, tokenize=False).startswith("<s>[SYSTEM_PROMPT]")
    assert want[0] == 1 and 17 in want  # <s>, [SYSTEM_PROMPT]
    text = "The quick brown fox jumps over the lazy dog."
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    assert tok.encode("[INST]", add_special_tokens=False) != [3]  # text, not control
    with pytest.raises(ValueError, match="not supported for Mistral tokenizers"):
        llm.chat(messages, chat_template="{{ messages }}", use_tqdm=False)


def test_magistral_reasoning_tags_are_control_tokens(mistral_dir):
    """--reasoning-parser mistral finds [THINK] / [/THINK] as the control tokens they are
    (text never encodes to them), so structured outputs start after the reasoning."""
    llm = make_llm(mistral_dir, reasoning_parser="mistral", **MISTRAL)
    assert llm.llm_engine.reasoning_tags == (20, 21)
    tok = llm.get_tokenizer()
    assert tok.decode([5, 20, 21]) == "[AVAILABLE_TOOLS][THINK][/THINK]"
    assert tok.decode([5, 20, 21], skip_special_tokens=True) == ""


def test_structured_outputs_through_mistrals_tokenizer(mistral_dir):
    """xgrammar reads tekken's byte vocabulary (its HF reader cannot): a choice and a
    regex constrain the reply, with adapters or without."""
    llm = make_llm(mistral_dir, **MISTRAL)
    choices = ["Zürich", "Ça va très bien"]  # tokens of partial characters only
    for spec, ok in ((StructuredOutputsParams(choice=choices), choices.__contains__),
                     (StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2}"),
                      re.compile(r"[0-9]{3}-[a-z]{2}").fullmatch)):
        params = SamplingParams(temperature=0.8, seed=3, max_tokens=20,
                                structured_outputs=spec)
        for out in llm.generate(["The capital of France is", "Numbers like"], params,
                                use_tqdm=False):
            assert ok(out.outputs[0].text), out.outputs[0].text


def test_sentencepiece_v3_tokenizer(tmp_path):
    """A tokenizer.model.v3 (Mistral 7B v0.3's, shipped in mistral_common's package) in a
    Mistral-format folder: "auto" picks it, text round-trips, chat is mistral_common's
    encoding and xgrammar reads its byte-fallback pieces."""
    import mistral_common
    import xgrammar as xgr

    from loraplex.engine.mistral_tokenizer import MistralTokenizer as Ours
    from loraplex.engine.mistral_tokenizer import resolve_tokenizer_mode

    data = Path(mistral_common.__file__).parent / "data"
    shutil.copy(data / "mistral_instruct_tokenizer_240323.model.v3",
                tmp_path / "tokenizer.model.v3")
    assert resolve_tokenizer_mode("auto", str(tmp_path)) == "hf"  # not Mistral's format
    (tmp_path / "consolidated.safetensors").write_bytes(b"")
    assert resolve_tokenizer_mode("auto", str(tmp_path)) == "mistral"
    tok = Ours.from_pretrained(str(tmp_path))
    text = "Hello world, the capital of France is Paris.\nÇa va?"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    assert tok.encode(text)[0] == tok.bos_token_id == 1
    reference = MistralTokenizer.from_file(str(tmp_path / "tokenizer.model.v3"))
    want = reference.encode_chat_completion(ChatCompletionRequest(
        messages=[UserMessage(content="Hi"), AssistantMessage(content="Hello."),
                  UserMessage(content="Bye")])).tokens
    assert tok.encode_chat([{"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello."},
                            {"role": "user", "content": "Bye"}]) == want
    info = tok.xgrammar_info(xgr, len(tok))
    assert info.vocab_size == 32768 and info.stop_token_ids == [2]


def test_params_json_fields(tmp_path):
    """params.json's sliding windows (an int; a per-layer list, None a global layer), its
    max_position fallbacks (config.json's, then max_seq_len, then 128k) and its dtype
    (the consolidated weights')."""
    from safetensors.torch import save_file

    from loraplex.models.config_flags import sliding_window
    from loraplex.models.mistral_format import mistral_config

    base = {"dim": 64, "n_layers": 4, "hidden_dim": 128, "n_heads": 4, "n_kv_heads": 2,
            "norm_eps": 1e-5, "vocab_size": 512}
    save_file({"norm.weight": torch.ones(64, dtype=torch.bfloat16)},
              str(tmp_path / "consolidated.safetensors"))
    (tmp_path / "params.json").write_text(json.dumps({**base, "sliding_window": [None, 8],
                                                      "max_seq_len": 4096}))
    cfg = mistral_config(str(tmp_path))
    assert cfg.layer_types == ["full_attention", "sliding_attention"] * 2
    assert sliding_window(cfg, "MistralForCausalLM") == {"sliding_window": 8,
                                                         "window_layers": (1, 3)}
    assert cfg.max_position_embeddings == 4096 and cfg.head_dim == 16
    assert str(cfg.dtype).endswith("bfloat16") and cfg.architectures == ["MistralForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 32768}))
    assert mistral_config(str(tmp_path)).max_position_embeddings == 32768
    (tmp_path / "config.json").unlink()
    (tmp_path / "params.json").write_text(json.dumps({**base, "sliding_window": 8}))
    cfg = mistral_config(str(tmp_path))
    assert cfg.max_position_embeddings == 128_000
    assert sliding_window(cfg, "MistralForCausalLM") == {"sliding_window": 8,
                                                         "window_layers": (0, 1, 2, 3)}
    (tmp_path / "params.json").write_text(json.dumps({**base, "sliding_window": [8, 4]}))
    with pytest.raises(ValueError, match="sliding_window"):
        mistral_config(str(tmp_path))


def _params(path: Path, **changes) -> Path:
    params = json.loads((path / "params.json").read_text())
    (path / "params.json").write_text(json.dumps({**params, **changes}))
    return path


@pytest.mark.parametrize("case,match", [
    ("no_params", "reads params.json, which"),
    ("vision", "vision encoder"),
    ("moe", "mixture of experts"),
    ("no_consolidated", "no consolidated"),
    ("no_tokenizer", "no tekken.json"),
])
def test_unsupported_checkpoints_refused(case, match, mistral_dir, tiny_models, tmp_path):
    """What this loader does not serve fails at start-up with a message saying what."""
    bad = tmp_path / case
    shutil.copytree(mistral_dir, bad)
    if case == "no_params":
        bad = tiny_models["mistral"]  # an HF-format checkpoint
    elif case == "vision":  # (a whole one is served: tests/test_pixtral_mistral_format.py)
        _params(bad, vision_encoder={"hidden_size": 64, "num_hidden_layers": 1})
    elif case == "moe":
        _params(bad, moe={"num_experts": 4, "num_experts_per_tok": 2})
    elif case == "no_consolidated":
        (bad / "consolidated.safetensors").unlink()
    elif case == "no_tokenizer":
        (bad / "tekken.json").unlink()
    with pytest.raises(ValueError, match=match):
        make_llm(bad, **({"config_format": "mistral"} if case == "no_params" else MISTRAL))


def _serve(model: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loraplex.entrypoints.cli", "serve",
                           str(model), "--dtype", "float32", *args], capture_output=True,
                          text=True, timeout=120, env=clean_env())


def test_server_refuses_vision_params_and_chat_template(mistral_dir, tmp_path):
    """`loraplex serve` stops at start-up, saying why: a params.json whose vision encoder
    block lacks its settings; a --chat-template beside Mistral's tokenizer."""
    vision = _params(shutil.copytree(mistral_dir, tmp_path / "vision"),
                     vision_encoder={"hidden_size": 64})
    res = _serve(vision, "--tokenizer_mode", "mistral", "--config_format", "mistral",
                 "--load_format", "mistral")
    assert res.returncode != 0 and "vision encoder" in res.stderr, res.stderr[-2000:]
    res = _serve(mistral_dir, "--tokenizer-mode", "mistral", "--chat-template",
                 "{{ messages }}", "--cpu-kv-cache-gib", "0.05", "--max-model-len", "128")
    assert res.returncode != 0 and "--chat-template cannot be used" in res.stderr, \
        res.stderr[-2000:]


def test_server_chat_completions_and_adapters(mistral_dir, tiny_models, tiny_adapters,
                                              prompts):
    """`loraplex serve DIR --tokenizer-mode mistral --config-format mistral --load-format
    mistral --enable-lora --lora-modules ...` with the openai client: completions of the
    base and the adapters as HF + PEFT on the HF checkpoint; chat prompts as
    mistral_common encodes them (streamed once); bad chats fail alone with a 400."""
    hf_dir, ad = tiny_models["mistral"], tiny_adapters["mistral"]
    args = ["--tokenizer-mode", "mistral", "--config-format", "mistral", "--load-format",
            "mistral", "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
            "--lora-modules", f"a4={ad['r4_qv']}", f"a8={ad['r8_all']}",
            "--dtype", "float32", "--cpu-kv-cache-gib", "0.05", "--max-model-len", "256"]
    extra = {"ignore_eos": True, "return_tokens_as_token_ids": True}
    reference = MistralTokenizer.from_file(str(mistral_dir / "tekken.json"))
    chat_ids = reference.encode_chat_completion(ChatCompletionRequest(
        messages=[UserMessage(content="What is the capital of France?")])).tokens
    with RemoteServer(mistral_dir, args) as server:
        client = server.get_client()
        for model, adapter in ((str(mistral_dir), None), ("a4", ad["r4_qv"]),
                               ("a8", ad["r8_all"])):
            res = client.completions.create(model=model, prompt=prompts[1], max_tokens=6,
                                            temperature=0.0, logprobs=1, extra_body=extra)
            assert token_ids_of(res.choices[0].logprobs) == \
                torch.tensor(_greedy(hf_dir, adapter, prompts[1], 6)).tolist(), model
            chat = client.chat.completions.create(
                model=model, max_tokens=5, temperature=0.0, logprobs=True,
                messages=[{"role": "user", "content": "What is the capital of France?"}],
                extra_body=extra)
            assert chat.usage.prompt_tokens == len(chat_ids)
            got = [int(c.token.split(":", 1)[1]) for c in chat.choices[0].logprobs.content]
            assert got == _greedy(hf_dir, adapter, chat_ids, 5), model
        stream = client.completions.create(model="a8", prompt="The quick brown", max_tokens=5,
                                           temperature=0.0, stream=True,
                                           extra_body={"ignore_eos": True})
        text = "".join(c.choices[0].text for c in stream if c.choices)
        whole = client.completions.create(model="a8", prompt="The quick brown", max_tokens=5,
                                          temperature=0.0, extra_body={"ignore_eos": True})
        assert text == whole.choices[0].text
        r = server.post("/v1/chat/completions", {
            "model": "a4", "messages": [{"role": "user", "content": "Hi"}],
            "chat_template": "{{ messages }}"})
        assert r.status_code == 400 and "Mistral tokenizers" in r.json()["error"]["message"]
        r = server.post("/v1/chat/completions", {  # ends with the assistant: not a prompt
            "model": "a4", "messages": [{"role": "user", "content": "Hi"},
                                        {"role": "assistant", "content": "Hello"}]})
        assert r.status_code == 400 and "mistral_common" in r.json()["error"]["message"], r.text
        again = client.chat.completions.create(
            model="a4", max_tokens=3, temperature=0.0,
            messages=[{"role": "user", "content": "Hi"}])
        assert again.choices[0].finish_reason in ("length", "stop")


def _greedy(base: Path, adapter: Path | None, prompt: list[int], n: int) -> list[int]:
    from tests.fixtures import hf_greedy

    return hf_greedy(base, adapter, list(prompt), n)
