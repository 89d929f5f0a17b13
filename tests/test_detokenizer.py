"""IncrementalDetokenizer: equals a full decode, never shows half a character, bounded work
per token, stop strings (earliest match, straddling tokens, min_tokens) and hold-back."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from loraplex.engine.detokenizer import IncrementalDetokenizer
from loraplex.sampling_params import SamplingParams

CORPUS = [
    "héllo wörld, this is a tiny corpus for a tiny tokenizer.",
    "日本語のテキストも少し 入れます。 日本 東京",
    "emoji time 🙂 🙂 🎉 and more text: naïve café résumé",
    "The quick brown fox jumps over the lazy dog. Stop here END and more.",
    "Numbers 12345 and symbols #$%&*() — dashes – and “quotes”.",
]
WORDS = ["héllo", "wörld", "日本", "東京", "🙂", "🎉", "the", "quick", "fox", "END", "STOP",
         "café", "naïve", "12345", ",", ".", "—", "\n", "  ", "résumé", "Ωmega", "zebra"]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    """A byte-level BPE small enough that non-ASCII characters split across tokens."""
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    raw.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", clean_up_tokenization_spaces=False)


def detok(tok, params: SamplingParams | None = None, prompt: str = "") -> IncrementalDetokenizer:
    ids = tok.encode(prompt, add_special_tokens=False) if prompt else []
    return IncrementalDetokenizer(tok, ids, params or SamplingParams())


def feed(d: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    """Append ids one by one; the output text after each."""
    seen = []
    for t in ids:
        d.append(t)
        seen.append(d.output_text)
    return seen


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(WORDS) + rng.choice([" ", "", " "]) for _ in range(n))


def test_multibyte_characters_are_split_by_this_tokenizer(tok):
    # the premise of the partial-character tests below
    ids = tok.encode("🙂日本", add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids)


@pytest.mark.parametrize("seed", range(20))
def test_equals_full_decode_on_random_text(tok, seed):
    rng = random.Random(seed)
    text = random_text(rng, rng.randint(1, 60))
    ids = tok.encode(text, add_special_tokens=False)
    d = detok(tok, prompt=random_text(rng, 5) if seed % 2 else "")
    steps = feed(d, ids)
    assert d.output_text == tok.decode(ids) == text
    for i, s in enumerate(steps):
        assert "\ufffd" not in s  # never half a character, even mid-stream
        assert text.startswith(s)
        assert i == 0 or s.startswith(steps[i - 1])


@pytest.mark.parametrize("seed", range(20))
def test_random_token_ids(tok, seed):
    """Arbitrary ids (lone bytes, specials): the same text as decode, except that a
    trailing incomplete character is never released."""
    rng = random.Random(100 + seed)
    ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 80))]
    for skip in (True, False):
        d = detok(tok, SamplingParams(skip_special_tokens=skip), prompt="fox 日")
        steps = feed(d, ids)
        full = tok.decode(ids, skip_special_tokens=skip)
        assert full.startswith(d.output_text)
        if not full.endswith("\ufffd"):
            assert d.output_text == full
        assert all(not s.endswith("\ufffd") for s in steps)


def test_special_tokens(tok):
    ids = [tok.bos_token_id] + tok.encode("héllo 🙂", add_special_tokens=False) + \
        [tok.eos_token_id, tok.pad_token_id]
    d = detok(tok)
    feed(d, ids)
    assert d.output_text == "héllo 🙂"
    d = detok(tok, SamplingParams(skip_special_tokens=False))
    feed(d, ids)
    assert d.output_text == tok.decode(ids, skip_special_tokens=False) == "<s>héllo 🙂</s><pad>"


def test_partial_character_is_held_back(tok):
    ids = tok.encode("a🙂", add_special_tokens=False)
    assert len(ids) >= 3  # 'a' + at least two byte pieces of the emoji
    steps = feed(detok(tok), ids)
    assert steps[0] == "a" and steps[1] == "a" and steps[-1] == "a🙂"


def test_work_per_token_is_bounded(tok):
    lengths = []
    real = tok.decode

    def spy(ids, *args, **kwargs):
        lengths.append(len(ids))
        return real(ids, *args, **kwargs)

    text = random_text(random.Random(0), 400)
    ids = tok.encode(text, add_special_tokens=False)
    d = detok(tok, prompt=text)
    tok.decode = spy
    try:
        feed(d, ids)
    finally:
        del tok.decode
    assert d.output_text == text
    assert len(lengths) == 2 * len(ids) and max(lengths) <= 16


# ---- stop strings -------------------------------------------------------------------------
def run(tok, text: str, **kw) -> IncrementalDetokenizer:
    d = detok(tok, SamplingParams(**kw))
    feed(d, tok.encode(text, add_special_tokens=False))
    return d


def test_stop_string_truncates(tok):
    d = run(tok, "The quick fox END and more", stop=["END"])
    assert d.stop_string_hit() == "END"
    assert d.output_text == "The quick fox "
    d = run(tok, "The quick fox END and more", stop="END", include_stop_str_in_output=True)
    assert d.output_text == "The quick fox END"
    d = run(tok, "The quick fox", stop=["END"])
    assert d.stop_string_hit() is None and d.output_text == "The quick fox"


def test_appends_after_a_stop_are_ignored(tok):
    d = run(tok, "fox END", stop=["END"])
    feed(d, tok.encode(" more text", add_special_tokens=False))
    assert d.output_text == "fox " and d.stop_string_hit() == "END"


def test_earliest_match_wins(tok):
    # both are found in the same new text; "o w" starts first though listed second
    d = run(tok, "héllo wörld", stop=["wörld", "o w"])
    assert d.stop_string_hit() == "o w" and d.output_text == "héll"


def test_stop_string_across_tokens_and_multibyte(tok):
    d = run(tok, "the 日本 東京 fox", stop=["本 東"])
    assert d.stop_string_hit() == "本 東" and d.output_text == "the 日"
    d = run(tok, "fox 🙂🎉 zebra", stop=["🎉 z"], include_stop_str_in_output=True)
    assert d.output_text == "fox 🙂🎉 z"


def test_stop_strings_wait_for_min_tokens(tok):
    text = "END the quick fox END zebra"
    ids = tok.encode(text, add_special_tokens=False)
    first_end = len(tok.encode("END", add_special_tokens=False))
    d = detok(tok, SamplingParams(stop=["END"], min_tokens=first_end + 1))
    feed(d, ids)
    assert d.output_text == "END the quick fox " and d.stop_string_hit() == "END"


def test_visible_text_holds_back_a_possible_stop(tok):
    d = detok(tok, SamplingParams(stop=["STOP", "zebra"]))
    d.append(tok.encode("fox", add_special_tokens=False)[0])
    shown = []
    for t in tok.encode("fox ST", add_special_tokens=False):
        d.append(t)
        shown.append(d.visible_text(finished=False))
    assert d.output_text.endswith("ST")
    assert not shown[-1].endswith("S") and not shown[-1].endswith("ST")
    assert d.visible_text(finished=True) == d.output_text


@pytest.mark.parametrize("seed", range(10))
def test_streamed_text_is_never_taken_back(tok, seed):
    rng = random.Random(seed)
    text = random_text(rng, 40)
    stop = rng.choice(["STOP", "END", "zebra", "日本", "🙂 ", "fox,"])
    d = detok(tok, SamplingParams(stop=[stop, "qqq"], include_stop_str_in_output=seed % 2 == 1))
    shown = [""]
    for t in tok.encode(text, add_special_tokens=False):
        d.append(t)
        if d.stop_string_hit() is not None:
            break
        shown.append(d.visible_text(finished=False))
        assert stop not in shown[-1]
    final = d.visible_text(finished=True)
    assert all(final.startswith(s) for s in shown)
    want = text if stop not in text else text[:text.index(stop) + (len(stop) if seed % 2 else 0)]
    assert final == d.output_text == want


def test_visible_text_without_stops_is_everything(tok):
    d = run(tok, "héllo 🙂")
    assert d.visible_text(False) == d.visible_text(True) == "héllo 🙂"



def test_detokenize_false_gives_ids_only(tiny_models, prompts):
    """vLLM's detokenize=False: the same token ids, no text; stop strings need text."""
    from loraplex import SamplingParams
    from tests.engine_utils import make_llm

    llm = make_llm(tiny_models["llama"])
    kw = dict(temperature=0.0, max_tokens=6, ignore_eos=True)
    plain, ids_only = llm.generate([{"prompt_token_ids": prompts[1]}] * 2,
                                   [SamplingParams(**kw), SamplingParams(**kw, detokenize=False)],
                                   use_tqdm=False)
    assert ids_only.outputs[0].token_ids == plain.outputs[0].token_ids
    assert plain.outputs[0].text and ids_only.outputs[0].text == ""
    with pytest.raises(ValueError, match="only supported when detokenize is True"):
        SamplingParams(stop=["x"], detokenize=False)
