"""A tiny random Idefics3 / SmolVLM (a SigLIP tower, pixel shuffle, one projection, a Llama
language model), its image processor and tokenizer (with `<image>`,
`<fake_token_around_image>`, `<global-img>`, `<row_i_col_j>`), PEFT adapters on it, and
HF transformers (+ PEFT) as the reference: the ground truth of tests/test_smolvlm.py.

The reference prompt is HF's: Idefics3Processor's own (built in memory from the
checkpoint's tokenizer and image processor). SmolVLMProcessor needs num2words and a video
processor (torchvision) this environment lacks: its prompt is written by HF's own
`get_image_prompt_string` (processing_smolvlm.py), with the rows and columns HF's image
processor returns, then tokenized, as SmolVLMProcessor does."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loraplex import SamplingParams
from tests.fixtures import _reinit_, make_tokenizer
from tests.multimodal_fixtures import (  # noqa: F401 (some re-exported for the tests)
    check_jobs,
    hf_logprobs,
    image_processor,
    make_multimodal_adapter,
    tokenizer,
)

TILE, PATCH, SEQ = 16, 4, 4  # 16-pixel tiles of 4 x 4 patches, folded 2 x 2: 4 tokens a tile
MARKERS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
           *[f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
ASK = "User:<image>What is this?<end_of_utterance>\nAssistant:"
LANGUAGE_MODEL = r".*text_model.*\."  # the language model's modules, for PEFT's targets


def make_tiny_idefics3(out: Path, seed: int, family: str = "smolvlm",
                       splitting: bool = True, tied: bool = False) -> Path:
    """A 2-layer Llama behind a 2-layer SigLIP tower on 16-pixel tiles (`family`:
    "idefics3" or "smolvlm"); images resized to a longest edge of 32 pixels, so split
    into at most 2 x 2 tiles and the global view (`splitting`); weights std 0.2."""
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    tok.save_pretrained(str(out))
    lm = dict(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=1024, rms_norm_eps=1e-6, bos_token_id=1,
              eos_token_id=2, pad_token_id=3, tie_word_embeddings=tied)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=TILE, patch_size=PATCH)
    name = "Idefics3" if family == "idefics3" else "SmolVLM"
    cfg = getattr(transformers, f"{name}Config")(
        text_config=lm, vision_config=vision, scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{name}ForConditionalGeneration")(cfg).eval()
    with torch.no_grad():
        _reinit_(model, seed, 0.2)
    model.save_pretrained(str(out))
    processor_class(name)(size={"longest_edge": 2 * TILE}, max_image_size={"longest_edge": TILE},
                          do_image_splitting=splitting).save_pretrained(str(out))
    (out / "processor_config.json").write_text(json.dumps(
        {"processor_class": f"{name}Processor", "image_seq_len": SEQ}))
    return out


@torch.no_grad()
def hf_positions(side: int) -> torch.Tensor:
    """The positions HF's SigLIP embeddings give the patches of a whole tile of `side` x
    `side` patches (its table `side` x `side`)."""
    from transformers import SmolVLMVisionConfig
    from transformers.models.smolvlm.modeling_smolvlm import SmolVLMVisionEmbeddings

    emb = SmolVLMVisionEmbeddings(SmolVLMVisionConfig(
        hidden_size=4, num_attention_heads=1, image_size=side, patch_size=1))
    emb.patch_embedding.weight.zero_()
    emb.patch_embedding.bias.zero_()
    table = torch.arange(side * side, dtype=torch.float32)  # each position's own index
    emb.position_embedding.weight.copy_(table[:, None].expand(-1, 4))
    got = emb(torch.zeros(1, 3, side, side), torch.ones(1, side, side, dtype=torch.bool))
    return got[0, :, 0].long()


def hf_positions_are_trained() -> bool:
    """Whether the installed transformers gives a whole tile's patches the positions the
    models were trained with (0, 1, 2, ... on a 4 x 4 tile: transformers 5's, vLLM's, the
    original Idefics2 code's). transformers 4.56 scales the coordinates by (1 - 1e-6)
    before bucketizing, which puts most patches one position lower: its image outputs
    are not the trained model's, so they are no reference."""
    return torch.equal(hf_positions(4), torch.arange(16))


def processor_class(name: str) -> type:
    """HF's image processor that needs no torchvision (transformers 5: the PIL one)."""
    import transformers

    return getattr(transformers, f"{name}ImageProcessorPil", None) \
        or getattr(transformers, f"{name}ImageProcessor")


def with_adapters(base: Path, seed: int) -> dict[str, Path]:
    """`base` and two adapters on its language model: r8 (q, v, down), r4 (k, o, gate)."""
    return {"base": base,
            "r8": make_multimodal_adapter(base, base.parent / "r8", r=8, seed=seed,
                                          targets=LANGUAGE_MODEL + "(q_proj|v_proj|down_proj)"),
            "r4": make_multimodal_adapter(base, base.parent / "r4", r=4, seed=seed + 1,
                                          targets=LANGUAGE_MODEL + "(k_proj|o_proj|gate_proj)")}


def family(base: Path) -> str:
    return json.loads((base / "config.json").read_text())["model_type"]


def hf_inputs(base: Path, prompt: str, images: list, add_special_tokens: bool = True
              ) -> dict[str, torch.Tensor]:
    """HF's ids of the prompt, its images' pixels and pixel mask: Idefics3Processor's own
    output; SmolVLM's by SmolVLMProcessor's rule (`get_image_prompt_string` with the rows
    and columns HF's image processor gives) on the text, then tokenized."""
    tok, proc = tokenizer(str(base)), image_processor(str(base))
    if family(base) == "idefics3":
        from transformers import Idefics3Processor

        out = Idefics3Processor(proc, tok, image_seq_len=SEQ)(
            text=[prompt], images=[images] if images else None, return_tensors="pt",
            add_special_tokens=add_special_tokens)
        return {k: v for k, v in out.items() if k != "attention_mask"}
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    out = {}
    if images:
        out = dict(proc(images=[images], return_tensors="pt", return_row_col_info=True))
        grids = zip(out.pop("rows")[0], out.pop("cols")[0], strict=True)
        pieces = prompt.split("<image>")
        prompt = pieces[0] + "".join(
            get_image_prompt_string(r, c, SEQ, "<fake_token_around_image>", "<image>",
                                    "<global-img>") + rest
            for (r, c), rest in zip(grids, pieces[1:], strict=True))
    ids = tok(prompt, add_special_tokens=add_special_tokens).input_ids
    out["input_ids"] = torch.tensor([ids])
    return out


def check(outs, base: Path, jobs: list[tuple[str, list, Path | None]],
          add_special_tokens: bool = True) -> None:
    """check_jobs with this model's hf_inputs."""
    check_jobs(outs, base, jobs, hf_inputs, add_special_tokens)
