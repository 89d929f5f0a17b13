"""vLLM's allowed_token_ids, bad_words and truncate_prompt_tokens against HF + PEFT: greedy
decoding with the same tokens forbidden, computed from HF's logits, in a batch with an
adapter and requests without the options; bad words in the tokenizer of the request's
adapter; over HTTP as extra_body fields."""

from __future__ import annotations

import pytest
import torch

from loraplex import LoRARequest, SamplingParams
from loraplex.engine.prompt_checks import bad_words_token_ids
from tests.engine_utils import make_llm
from tests.fixtures import hf_greedy, load_hf_model

NEW = 8


@torch.no_grad()
def hf_greedy_with(base, adapter, prompt: list[int], allowed=None, bad=()) -> list[int]:
    """HF's greedy decoding with vLLM's rules: only `allowed` ids; a bad word's last token
    banned right after its other tokens (a one-token word: always)."""
    model = load_hf_model(base, adapter)
    out: list[int] = []
    for _ in range(NEW):
        logits = model(input_ids=torch.tensor([prompt + out])).logits[0, -1].float()
        if allowed is not None:
            logits = torch.full_like(logits, float("-inf")).index_copy(
                0, torch.tensor(allowed), logits[allowed])
        for word in bad:
            if len(word) == 1 or out[-(len(word) - 1):] == word[:-1]:
                logits[word[-1]] = float("-inf")
        out.append(int(logits.argmax()))
    return out


def test_allowed_and_bad_words_match_hf(tiny_models, tiny_adapters, prompts, tokenizer):
    base, adapter = tiny_models["llama"], tiny_adapters["llama"]["r8_all"]
    lora = LoRARequest("r8_all", 1, str(adapter))
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=16)
    plain = hf_greedy(base, adapter, prompts[2], NEW)

    def word(ids: list[int]) -> str | None:
        """The text of `ids` if it is a word the tokenizer encodes as len(ids) tokens."""
        text = tokenizer.decode(ids).strip()
        return text if text and len(tokenizer.encode(text, add_special_tokens=False)) == \
            len(ids) else None
    # words of the plain output: a one-token and a two-token bad word
    one = next(w for t in plain if (w := word([t])))
    two = next(w for i in range(NEW - 1) if (w := word(plain[i:i + 2])) and w != one)
    bad = bad_words_token_ids([one, two], tokenizer)
    assert any(len(w) == 1 for w in bad) and any(len(w) > 1 for w in bad), bad
    allowed = sorted({plain[1], plain[4], 17, 99, 250})
    params = [SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True,
                             allowed_token_ids=allowed),
              SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True,
                             bad_words=[one, two]),
              SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)]
    outs = llm.generate([{"prompt_token_ids": prompts[2]}] * 2 + [{"prompt_token_ids":
                                                                  prompts[3]}],
                        params, lora_request=[lora, lora, None], use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outs]
    assert got[0] == hf_greedy_with(base, adapter, prompts[2], allowed=allowed)
    assert set(got[0]) <= set(allowed)
    assert got[1] == hf_greedy_with(base, adapter, prompts[2], bad=bad) != plain
    assert got[2] == hf_greedy(base, None, prompts[3], NEW)  # a neighbour without them


def test_truncate_prompt_tokens(tiny_models, prompts):
    base = tiny_models["llama"]
    llm = make_llm(base, max_model_len=32)
    long = prompts[-1]
    assert len(long) > 10
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True,
                            truncate_prompt_tokens=10)
    out = llm.generate([{"prompt_token_ids": long}], params, use_tqdm=False)[0]
    assert out.prompt_token_ids == long[-10:]
    assert out.outputs[0].token_ids == hf_greedy(base, None, long[-10:], 4)
    # -1: as much as max_model_len leaves room for; without it the prompt is too long
    too_long = (long * 3)[:40]
    params.truncate_prompt_tokens = -1
    out = llm.generate([{"prompt_token_ids": too_long}], params, use_tqdm=False)[0]
    assert out.prompt_token_ids == too_long[-31:]
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([{"prompt_token_ids": too_long}], SamplingParams(max_tokens=1),
                     use_tqdm=False)
    with pytest.raises(ValueError, match="allowed_token_ids token id 600 is out of range"):
        llm.generate(["Hi"], SamplingParams(allowed_token_ids=[3, 600]), use_tqdm=False)
