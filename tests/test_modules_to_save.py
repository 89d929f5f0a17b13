"""Adapters with fully trained embed_tokens / lm_head (PEFT's modules_to_save) under
--enable-lora-modules-to-save, against HF + PEFT (fp32): mixed batches with the base and
plain adapters, more adapters than slots, prompts in chunks, tied embeddings; refused by
name without the flag or for other modules, while the engine carries on."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from loraplex import LoRARequest
from loraplex.lora.errors import LoRAError
from tests.engine_utils import check_mixed_batch, make_llm
from tests.fixtures import edited_copy, make_peft_adapter, make_tiny_model


@pytest.fixture(scope="module")
def trained(tiny_root: Path, tiny_models) -> dict[str, Path]:
    base = tiny_models["llama"]
    root = tiny_root / "modules_to_save"
    return {
        "both": make_peft_adapter(base, root / "both", r=4, lora_alpha=8, seed=90,
                                  target_modules=["q_proj", "v_proj"],
                                  modules_to_save=["embed_tokens", "lm_head"]),
        "head": make_peft_adapter(base, root / "head", r=8, lora_alpha=16, seed=91,
                                  target_modules=["o_proj"], modules_to_save=["lm_head"]),
        "embed": make_peft_adapter(base, root / "embed", r=8, lora_alpha=8, seed=92,
                                   target_modules=["down_proj"],
                                   modules_to_save=["embed_tokens"]),
    }


@pytest.mark.parametrize("budget", [None, 6])
def test_mixed_batch_matches_peft(budget, tiny_models, tiny_adapters, trained, prompts):
    """Base, a plain adapter and three that replace one or both tables, over two slots;
    budget 6: prompts prefilled in chunks."""
    base = tiny_models["llama"]
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=16,
                   enable_lora_modules_to_save=True, max_num_batched_tokens=budget)
    check_mixed_batch(llm, base, {**trained, "r4_qv": tiny_adapters["llama"]["r4_qv"]},
                      prompts)


def test_tied_embeddings(tiny_root, prompts):
    """A model whose lm_head is its embedding: each trained copy replaces its own module,
    as in PEFT."""
    base = make_tiny_model(tiny_root / "mts_tied", "llama", seed=93, tie_word_embeddings=True)
    adapters = {"both": make_peft_adapter(base, tiny_root / "mts_tied_both", r=4, seed=94,
                                          target_modules=["q_proj"],
                                          modules_to_save=["embed_tokens", "lm_head"]),
                "embed": make_peft_adapter(base, tiny_root / "mts_tied_embed", r=4, seed=95,
                                           target_modules=["k_proj"],
                                           modules_to_save=["embed_tokens"])}
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=8,
                   enable_lora_modules_to_save=True)
    check_mixed_batch(llm, base, adapters, prompts, extra=2)


def test_slots_hold_both_tables(tiny_models):
    llm = make_llm(tiny_models["llama"], enable_lora=True, max_loras=3,
                   enable_lora_modules_to_save=True)
    manager = llm.llm_engine.lora_manager
    extra = manager.extra_vocab.slot_bytes()
    assert manager.fixed_slot_bytes() - extra == 2 * 512 * 64 * 4  # vocab x hidden, fp32
    assert make_llm(tiny_models["llama"], enable_lora=True).llm_engine.lora_manager \
        .full_vocab is None


def test_refused_by_name(tiny_models, tiny_adapters, trained, tmp_path, prompts):
    """Without the flag, and with a module other than embed_tokens / lm_head, the adapter
    fails alone with the fix in its message; the engine serves the others."""
    base = tiny_models["llama"]
    plain = make_llm(base, enable_lora=True, max_lora_rank=16)
    with pytest.raises(LoRAError, match=re.escape("need the engine started with "
                                                  "--enable-lora-modules-to-save")):
        plain.llm_engine.add_lora(LoRARequest("both", 1, str(trained["both"])))
    llm = make_llm(base, enable_lora=True, max_lora_rank=16, enable_lora_modules_to_save=True)
    norm = edited_copy(trained["both"], tmp_path / "norm", lambda c: c.update(
        modules_to_save=["embed_tokens", "model.norm"]))
    with pytest.raises(LoRAError, match=re.escape("fully trained model.norm are not supported")):
        llm.llm_engine.add_lora(LoRARequest("norm", 2, str(norm)))
    # a trained table not named in modules_to_save: not taken for an untrained copy
    unnamed = edited_copy(trained["head"], tmp_path / "unnamed",
                          lambda c: c.update(modules_to_save=None))
    with pytest.raises(LoRAError, match="modules_to_save does not name it"):
        llm.llm_engine.add_lora(LoRARequest("unnamed", 3, str(unnamed)))
    # modules_to_save names a table the files lack
    from safetensors.torch import load_file, save_file

    lacking = shutil.copytree(trained["both"], tmp_path / "lacking")
    tensors = load_file(str(lacking / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.endswith("lm_head.weight")},
              str(lacking / "adapter_model.safetensors"))
    with pytest.raises(LoRAError, match="modules_to_save names lm_head but its weights have "
                                        "no such table"):
        llm.llm_engine.add_lora(LoRARequest("lacking", 5, str(lacking)))
    for engine in (plain, llm):
        out = engine.generate([{"prompt_token_ids": prompts[0]}], use_tqdm=False,
                              lora_request=LoRARequest("ok", 4,
                                                       str(tiny_adapters["llama"]["r4_qv"])))
        assert out[0].outputs[0].token_ids


def test_through_decode_graphs(monkeypatch, tiny_models, tiny_adapters, trained, prompts):
    """Decode steps replayed from graphs (stand-ins on the CPU): the embedding's rows come
    from a slot's table inside the graph, as adapters are swapped through two slots."""
    import torch

    from tests.engine_utils import GREEDY, check_against_hf, lora_requests
    from tests.test_cuda_graphs import llm_with_decode_graphs

    cuda = torch.cuda.is_available()
    base = tiny_models["llama"]
    llm = llm_with_decode_graphs(monkeypatch, base, enable_lora=True, max_loras=2,
                                 max_lora_rank=8, max_num_seqs=8, block_size=8,
                                 max_model_len=64, enable_lora_modules_to_save=True)
    runner = llm.llm_engine.model_runner
    paths = {**trained, "r4_qv": tiny_adapters["llama"]["r4_qv"]}
    reqs = lora_requests(paths)
    names = ["embed", None, "both", "r4_qv", "head"]
    batch = [prompts[i] for i in range(len(names))]
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], GREEDY,
                        lora_request=[reqs[n] if n else None for n in names], use_tqdm=False)
    assert runner.cuda_graphs.num_replays > 0 and runner.num_eager_decode_steps == 0
    check_against_hf(outs, base, [paths[n] if n else None for n in names], batch,
                     atol=1e-4 if not cuda else 2e-3)


def test_with_added_tokens(tiny_root, tiny_models, prompts):
    """LLaMA-Factory's resize_vocab: tokens added, both resized tables fully trained. The
    base rows come from the adapter's tables, the added ones from its extra-vocabulary rows;
    prompts hold the added ids (its own tokenizer's)."""
    from tests.engine_utils import GREEDY, check_against_hf
    from tests.fixtures import make_added_tokens_adapter
    from tests.test_added_tokens import _prompt_with_added

    base = tiny_models["llama"]
    adapter = make_added_tokens_adapter(base, tiny_root / "mts_added", mode="modules_to_save",
                                        new_tokens=("<a>", "<b>"), seed=96)
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8,
                   enable_lora_modules_to_save=True)
    req = LoRARequest("added", 1, str(adapter))
    batch = [_prompt_with_added(prompts[0], 2), prompts[1]]
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], GREEDY,
                        lora_request=[req, None], use_tqdm=False)
    check_against_hf(outs, base, [adapter, None], batch)


def test_over_http(tiny_models, trained, prompts):
    """`loraplex serve --enable-lora-modules-to-save`: the adapter by name over HTTP with
    the openai client, equal to HF + PEFT; the base beside it is the base."""
    from tests.fixtures import hf_greedy
    from tests.server_utils import RemoteServer, token_ids_of

    base = tiny_models["llama"]
    args = ["--served-model-name", "tiny", "--enable-lora", "--enable-lora-modules-to-save",
            "--max-lora-rank", "8", "--dtype", "float32", "--max-model-len", "128",
            "--cpu-kv-cache-gib", "0.05", "--lora-modules", f"both={trained['both']}"]
    with RemoteServer(base, args) as server:
        client = server.get_client()
        for model, adapter in (("both", trained["both"]), ("tiny", None)):
            r = client.completions.create(
                model=model, prompt=prompts[0], max_tokens=6, temperature=0, logprobs=1,
                extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
            assert token_ids_of(r.choices[0].logprobs) == hf_greedy(base, adapter, prompts[0], 6)
