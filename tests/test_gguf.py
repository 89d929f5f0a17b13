"""GGUF files as bases, with PEFT adapters (trained on the HF model) on top.

The reference is transformers' own GGUF reading (`from_pretrained(dir, gguf_file=...)`,
which dequantizes) plus PEFT, fp32, on the same file; the files are written as llama.cpp's
converter writes them (tests/gguf_fixtures.py: its names, Llama's q/k permutation, Q8_0 /
Q4_0 / F16 matrices), so a missed permutation or a wrong dequantization shows.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraplex import LoRARequest
from tests.conftest import ADAPTER_SPECS
from tests.engine_utils import GREEDY, check_against_hf, make_llm
from tests.fixtures import hf_greedy, hf_logprobs, make_peft_adapter, make_tiny_model
from tests.server_utils import RemoteServer, clean_env, token_ids_of

gguf = pytest.importorskip("gguf")

from tests.gguf_fixtures import write_gguf  # noqa: E402 (needs gguf)

ADAPTERS = ("r4_qv", "r8_all", "r16_rslora")
# the files the tests write: (arch, the matrices' type)
CASES = [("llama", "Q8_0"), ("llama", "F16"), ("qwen2", "Q8_0"), ("qwen3", "Q4_0"),
         ("phi3", "Q8_0"), ("gemma2", "Q8_0"), ("gemma3", "Q8_0")]
# a tiny HF model of its own per arch past the session's (ties: as llama.cpp writes Gemma)
OWN_MODELS = {"qwen3": dict(head_dim=128), "phi3": {}, "gemma2": dict(tie_word_embeddings=True),
              "gemma3": dict(tie_word_embeddings=True)}
OWN_ADAPTERS = {"r4_qkv": dict(r=4, lora_alpha=8, target_modules=["qkv_proj"], seed=21),
                "r8_all": ADAPTER_SPECS["r8_all"]}


class TinyModels:
    """arch -> (HF model dir, its PEFT adapters), built when first asked for: the session's
    Llama and Qwen2; a Qwen3 of head_dim 128, since transformers reads no head_dim from a
    qwen3 GGUF (Qwen3Config's default, 128, every released Qwen3's); Phi-3 (fused qkv, so
    its r4 adapter is on qkv_proj), Gemma 2 and Gemma 3."""

    def __init__(self, root: Path, tiny_models, tiny_adapters) -> None:
        self.root, self.built = root, {a: (tiny_models[a], {n: tiny_adapters[a][n] for n in
                                                            ADAPTERS}) for a in ("llama", "qwen2")}

    def __getitem__(self, arch: str) -> tuple[Path, dict[str, Path]]:
        if arch not in self.built:
            base = make_tiny_model(self.root / f"{arch}-hf", arch, seed=7, **OWN_MODELS[arch])
            specs = OWN_ADAPTERS if arch == "phi3" else {
                n: ADAPTER_SPECS[n] for n in ADAPTERS if arch == "qwen3" or n != "r16_rslora"}
            self.built[arch] = (base, {n: make_peft_adapter(base, self.root / f"{arch}-ad" / n,
                                                            **spec) for n, spec in specs.items()})
        return self.built[arch]


class GGUFFiles:
    """(arch, type) -> a GGUF file of the arch's tiny model in a folder of its own, written
    when first asked for."""

    def __init__(self, root: Path, models: TinyModels) -> None:
        self.root, self.models, self.written = root, models, {}

    def __getitem__(self, case: tuple[str, str]) -> Path:
        if case not in self.written:
            folder = self.root / "-".join(case)
            folder.mkdir(parents=True, exist_ok=True)
            self.written[case] = write_gguf(self.models[case[0]][0],
                                            folder / f"{'-'.join(case)}.gguf", case[1])
        return self.written[case]


@pytest.fixture(scope="module")
def hf_models(tiny_root: Path, tiny_models, tiny_adapters) -> TinyModels:
    return TinyModels(tiny_root / "gguf", tiny_models, tiny_adapters)


@pytest.fixture(scope="module")
def gguf_files(tiny_root: Path, hf_models) -> GGUFFiles:
    return GGUFFiles(tiny_root / "gguf", hf_models)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c))
def test_gguf_base_with_mixed_adapters_matches_hf_peft(case, gguf_files, hf_models, prompts,
                                                       caplog):
    """Base and adapters of different ranks in one batch over the dequantized file, each
    equal to HF's GGUF model + PEFT; the tokenizer is the HF model's (vLLM's advice)."""
    arch, _ = case
    path, (hf_dir, ad) = gguf_files[case], hf_models[arch]
    with caplog.at_level("INFO", logger="loraplex.models.gguf_loader"):
        llm = make_llm(path, tokenizer=str(hf_dir), enable_lora=True, max_loras=3,
                       max_lora_rank=16)
    assert "dequantized into" in caplog.text
    # Q8_0 / Q4_0 matrices kept in GPTQ's layout (tests/test_gguf_quant.py), F16 dequantized
    assert ("matrices kept quantized" in caplog.text) == (case[1] != "F16"), caplog.text
    reqs = [None, *(LoRARequest(n, i + 1, str(ad[n])) for i, n in enumerate(sorted(ad)))]
    jobs = [(p, r) for i, p in enumerate(prompts[:4]) for r in reqs[i % 2:][:3]]
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in jobs], GREEDY,
                        lora_request=[r for _, r in jobs])
    # atol: the weights are HF's bit for bit (both dequantize with `gguf`); on the 30-token
    # prompt one rsLoRA top-3 logprob is 2.6e-4 off HF's fp32 forward (summation order)
    check_against_hf(outs, path, [ad[r.lora_name] if r else None for _, r in jobs],
                     [p for p, _ in jobs], atol=3e-4)
    # quantization changed the weights: the original checkpoint would not be the reference
    base_out = outs[0].outputs[0].logprobs[0]
    tok = outs[0].outputs[0].token_ids[0]
    original = hf_logprobs(hf_dir, None, jobs[0][0])[-1, tok].item()
    assert abs(base_out[tok].logprob - original) > 1e-4 or case[1] == "F16"


def test_tokenizer_and_chat_template_from_the_file(gguf_files, tiny_models, prompts):
    """No `tokenizer` given: the file's own (transformers builds it from the metadata),
    with its chat template; text prompts and chat give what the HF tokenizer would."""
    from transformers import AutoTokenizer

    path = gguf_files[("llama", "Q8_0")]
    llm = make_llm(path)
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok = llm.get_tokenizer()
    text = "What is the capital of France? Paris, and 42 more."
    assert tok(text).input_ids == ref(text).input_ids == \
        AutoTokenizer.from_pretrained(str(tiny_models["llama"]))(text).input_ids
    assert tok.chat_template and tok.chat_template == ref.chat_template
    copy = llm.llm_engine.load_tokenizer()  # the server's own copy: from the file too
    assert copy is not tok and copy(text).input_ids == tok(text).input_ids
    out = llm.generate([text], GREEDY)[0]
    assert out.prompt_token_ids == ref(text).input_ids
    assert out.outputs[0].token_ids == hf_greedy(path, None, out.prompt_token_ids, 8)
    chat = llm.chat([{"role": "user", "content": "Hi"}], GREEDY)[0]
    want = ref.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True,
                                   add_generation_prompt=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert chat.prompt_token_ids == list(want)


def test_server_with_adapters_on_a_gguf_base(gguf_files, tiny_models, tiny_adapters, prompts,
                                             tmp_path):
    """`loraplex serve x.gguf --tokenizer DIR --enable-lora --lora-modules ...` and the
    openai client: base and adapters as HF + PEFT on the file; an adapter whose shapes do
    not fit fails alone."""
    path, ad = gguf_files[("qwen2", "Q8_0")], tiny_adapters["qwen2"]
    args = ["--tokenizer", str(tiny_models["qwen2"]), "--enable-lora", "--lora-modules",
            f"a4={ad['r4_qv']}", f"a8={ad['r8_all']}", "--max-lora-rank", "16",
            "--dtype", "float32", "--cpu-kv-cache-gib", "0.05", "--max-model-len", "256"]
    wide = make_tiny_model(tmp_path / "wide", "qwen2", hidden_size=96)
    wide_lora = make_peft_adapter(wide, tmp_path / "wide_lora", r=4, seed=2)
    with RemoteServer(path, args, env={"LORAPLEX_ALLOW_RUNTIME_LORA_UPDATING": "True"}) \
            as server:
        client = server.get_client()
        assert {m.id for m in client.models.list().data} == {str(path), "a4", "a8"}
        for model, adapter in ((str(path), None), ("a4", ad["r4_qv"]), ("a8", ad["r8_all"])):
            res = client.completions.create(model=model, prompt=prompts[1], max_tokens=6,
                                            temperature=0.0, logprobs=1,
                                            extra_body={"ignore_eos": True,
                                                        "return_tokens_as_token_ids": True})
            assert token_ids_of(res.choices[0].logprobs) == hf_greedy(path, adapter,
                                                                      prompts[1], 6), model
        r = server.post("/v1/load_lora_adapter", {"lora_name": "wide",
                                                  "lora_path": str(wide_lora)})
        assert r.status_code == 400 and "do not fit" in r.json()["error"]["message"], r.text
        chat = client.chat.completions.create(model="a4", max_tokens=4, temperature=0.0,
                                              messages=[{"role": "user", "content": "Hi"}])
        assert chat.choices[0].message.content is not None


def _serve(model: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loraplex.entrypoints.cli", "serve",
                           str(model), "--dtype", "float32", *args], capture_output=True,
                          text=True, timeout=120, env=clean_env())


def _minimal_gguf(path: Path, arch: str, split_count: int | None = None) -> Path:
    """A well-formed GGUF of one tensor: an architecture loraplex does not serve (BERT), or
    one part of a split file."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    if split_count is not None:
        writer.add_uint16("split.count", split_count)
    writer.add_tensor("token_embd.weight", torch.zeros(8, 32).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_bad_gguf_bases_fail_at_start_up_with_a_clear_message(gguf_files, tiny_models,
                                                              tmp_path):
    good = gguf_files[("llama", "Q8_0")].read_bytes()
    (tmp_path / "cut.gguf").write_bytes(good[:len(good) - 3000])
    (tmp_path / "cut_header.gguf").write_bytes(good[:2000])
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04 a zip, not a GGUF" * 10)
    cases = {
        "cut.gguf": "truncated", "cut_header.gguf": "truncated",
        "not.gguf": "not a GGUF file", "missing.gguf": "no such GGUF file",
        "bert.gguf": "GGUF architecture 'bert' is not supported; supported: llama, qwen2",
    }
    _minimal_gguf(tmp_path / "bert.gguf", "bert")
    cases["part.gguf"] = "one part of a GGUF split in 3 files: merge them"
    _minimal_gguf(tmp_path / "part.gguf", "llama", split_count=3)
    for name, message in cases.items():
        with pytest.raises(ValueError, match=message):
            make_llm(tmp_path / name)
    with pytest.raises(ValueError, match="not a GGUF file"):  # an HF dir named as GGUF
        make_llm(tiny_models["llama"], load_format="gguf")
    with pytest.raises(ValueError, match="quantization='gguf' needs a GGUF file"):
        make_llm(tiny_models["llama"], quantization="gguf")
    res = _serve(tmp_path / "cut.gguf")
    assert res.returncode != 0 and "truncated" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr


def test_without_the_gguf_package_the_error_names_the_extra(gguf_files, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install 'loraplex\[gguf\]'"):
        make_llm(gguf_files[("llama", "Q8_0")])


def test_rope_scaling_the_config_does_not_read_is_warned_about(hf_models, tmp_path, caplog):
    """transformers builds no rope_scaling from a GGUF: the user is told to give it."""
    path = write_gguf(hf_models["llama"][0], tmp_path / "linear.gguf", "F16",
                      rope_scaling="linear")
    with caplog.at_level("WARNING", logger="loraplex.models.gguf_loader"):
        make_llm(path, tokenizer=str(hf_models["llama"][0]))
    assert "llama.rope.scaling.type" in caplog.text and "hf_overrides" in caplog.text


def test_hub_forms_repo_quant_type_and_repo_file(gguf_files, hf_models, tmp_path, monkeypatch,
                                                 prompts):
    """vLLM's `repo_id:quant_type` (the repo's one file of that type) and
    `repo_id/file.gguf`, here from an offline hub cache holding two quantizations."""
    import huggingface_hub.constants as hub

    revision = "2" * 40
    repo = tmp_path / "models--org--tiny-GGUF"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for case in (("llama", "Q8_0"), ("llama", "F16")):
        (snapshot / f"tiny-{case[1]}.gguf").write_bytes(gguf_files[case].read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    hf_dir = hf_models["llama"][0]
    for model, case in (("org/tiny-GGUF:Q8_0", "Q8_0"), ("org/tiny-GGUF:q8_0", "Q8_0"),
                        ("org/tiny-GGUF/tiny-F16.gguf", "F16")):
        llm = make_llm(model, tokenizer=str(hf_dir))
        out = llm.generate([{"prompt_token_ids": prompts[1]}], GREEDY)
        check_against_hf(out, gguf_files[("llama", case)], [None], [prompts[1]])
    with pytest.raises(ValueError, match=r"exactly one .gguf file of type Q4_K_M \(found: "
                                         r"none\)"):
        make_llm("org/tiny-GGUF:Q4_K_M")
    with pytest.raises(ValueError, match="cannot fetch it from the Hugging Face hub"):
        make_llm("org/elsewhere-GGUF:Q8_0")


def test_a_llama_file_named_mistral(gguf_files, hf_models, tmp_path, prompts):
    """transformers reads a llama file whose general.name is "mistral" as Mistral, and then
    cannot map its tensors (its own loading fails); loraplex maps them by the file's
    architecture: the same outputs as HF on the identical file named otherwise."""
    from transformers import AutoModelForCausalLM

    path = write_gguf(hf_models["llama"][0], tmp_path / "mistral.gguf", "Q8_0", name="mistral")
    with pytest.raises(NotImplementedError, match="mistral"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name)
    llm = make_llm(path, tokenizer=str(hf_models["llama"][0]))
    out = llm.generate([{"prompt_token_ids": prompts[2]}], GREEDY)
    check_against_hf(out, gguf_files[("llama", "Q8_0")], [None], [prompts[2]])
