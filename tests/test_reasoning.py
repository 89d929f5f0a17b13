"""Reasoning models (--reasoning-parser): the split of a reply into reasoning and content
(prefix-stable, so streamed deltas add up to the message), structured outputs that start
after the reasoning (the engine's matchers wait for </think>), and a real server with the
openai client, non-streamed and streamed, against the raw completion of the same prompt;
Magistral's [THINK] special tokens kept in the reply (mistral). Granite's phrases over a
server: tests/test_tool_calls.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from loraplex import SamplingParams
from loraplex.reasoning import REASONING_PARSERS, reasoning_ended
from loraplex.sampling_params import StructuredOutputsParams
from tests.engine_utils import make_llm
from tests.fixtures import add_tokens_to_model, make_tiny_model

R1, QWEN3 = REASONING_PARSERS["deepseek_r1"], REASONING_PARSERS["qwen3"]
MISTRAL, GRANITE = REASONING_PARSERS["mistral"], REASONING_PARSERS["granite"]
REPLIES = ["<think>\nhmm, 2 + 2</think>\n\nIt is 4.", "  <think>x</think>y", "no tags at all",
           "thinking</think>answer", "<think>cut off </thi", "<thinker>", "</think>", ""]
# (reply, its split) for Magistral's tags and Granite's phrases, as vLLM splits them
SPLITS = {MISTRAL: [
    ("[THINK]hmm, 2 + 2[/THINK]It is 4.", ("hmm, 2 + 2", "It is 4.")),
    ("Sure.[THINK]cut off [/THI", ("cut off [/THI", "Sure.")),  # around the tags: content
    ("a[THINK]b[/THINK]c", ("b", "ac")),
    ("a[/THINK]b [THINK", (None, "ab [THINK")),  # a [/THINK] alone is dropped
    ("[THINK]x[THINK]y[/THINK]z[/THINK]", ("x[THINK]y", "z[/THINK]")),
    ("[TH", (None, "[TH")), ("", (None, "")),
], GRANITE: [
    ("Here is my thought process:\n2 + 2\n\nHere is my response:\nIt is 4.",
     ("\n2 + 2\n\n", "\nIt is 4.")),
    (" Here's my thought process: x Here's my response: y", (" x ", " y")),
    ("Here is my thought process: x Here's my response: y Here is my response: z",
     (" x ", " y Here is my response: z")),
    ("Here is my thought process: cut off, Here is my respo", (" cut off, Here is my respo", "")),
    ("Here is my answer: 4.", (None, "Here is my answer: 4.")),
    ("4. Here is my thought process: x Here is my response: y",
     (None, "4. Here is my thought process: x Here is my response: y")),
    ("Here", (None, "Here")),
]}


@pytest.mark.parametrize(("reply", "r1", "qwen3"), [
    (REPLIES[0], ("\nhmm, 2 + 2", "\n\nIt is 4."), ("\nhmm, 2 + 2", "\n\nIt is 4.")),
    (REPLIES[1], ("x", "y"), ("x", "y")),
    (REPLIES[2], ("no tags at all", ""), (None, "no tags at all")),
    (REPLIES[3], ("thinking", "answer"), (None, "thinking</think>answer")),
    (REPLIES[4], ("cut off </thi", ""), ("cut off </thi", "")),
    (REPLIES[5], ("<thinker>", ""), (None, "<thinker>")),
])
def test_split(reply, r1, qwen3):
    assert R1.split(reply) == r1
    assert QWEN3.split(reply) == qwen3
    assert REASONING_PARSERS["glm45"].split(reply) == qwen3  # GLM-4.5's: qwen3's rule


@pytest.mark.parametrize(("parser", "reply", "split"), [
    (parser, reply, split) for parser, cases in SPLITS.items() for reply, split in cases],
    ids=lambda v: getattr(v, "name", None))
def test_split_magistral_and_granite(parser, reply, split):
    assert parser.split(reply) == split


@pytest.mark.parametrize(("parser", "reply"), [(p, r) for p in (R1, QWEN3) for r in REPLIES] + [
    (parser, reply) for parser, cases in SPLITS.items() for reply, _ in cases],
    ids=lambda v: getattr(v, "name", None))
def test_the_split_of_a_prefix_is_a_prefix_of_the_split(parser, reply):
    """What a stream sent after n characters is never taken back."""
    sent = ("", "")
    for n in range(len(reply) + 1):
        for finished in (False, True) if n == len(reply) else (False,):
            reasoning, content = parser.split(reply[:n], finished)
            assert (reasoning or "").startswith(sent[0]) and content.startswith(sent[1]), n
            sent = (reasoning or "", content)


def test_reasoning_parser_flag_names_every_parser():
    from loraplex.entrypoints.cli import _CHOICES

    assert sorted(_CHOICES["reasoning_parser"]) == sorted(REASONING_PARSERS)


def test_the_prompt_may_close_the_reasoning():
    start, end = 7, 8
    assert reasoning_ended([1, 2, start, 5, end, 3], start, end)  # enable_thinking=False
    assert not reasoning_ended([1, end, 2, start, 5], start, end)  # R1: <think> opened
    assert not reasoning_ended([1, 2, 3], start, end)


@pytest.fixture(scope="module")
def thinker(tiny_root: Path) -> Path:
    """A tiny llama whose tokenizer has <think> and </think> as tokens 512 and 513."""
    path = make_tiny_model(tiny_root / "thinker", "llama", seed=60)
    assert add_tokens_to_model(path, ["<think>", "</think>"], seed=61) == [512, 513]
    return path


@pytest.fixture(scope="module")
def magistral(tiny_root: Path) -> Path:
    """A tiny llama whose tokenizer has [THINK] and [/THINK] as special tokens 512, 513."""
    path = make_tiny_model(tiny_root / "magistral", "llama", seed=62)
    assert add_tokens_to_model(path, ["[THINK]", "[/THINK]"], special=True, seed=63) == [512,
                                                                                       513]
    return path


def test_tags_must_be_tokens(tiny_models, thinker, magistral):
    from transformers import AutoTokenizer

    assert R1.tag_ids(AutoTokenizer.from_pretrained(str(thinker))) == (512, 513)
    assert MISTRAL.tag_ids(AutoTokenizer.from_pretrained(str(magistral))) == (512, 513)
    # Granite's phrases are no tokens: structured outputs constrain the whole reply
    assert GRANITE.tag_ids(AutoTokenizer.from_pretrained(str(tiny_models["llama"]))) is None
    with pytest.raises(ValueError, match="'<think>' is not one token of this tokenizer"):
        make_llm(tiny_models["llama"], reasoning_parser="deepseek_r1")
    with pytest.raises(ValueError, match="reasoning_parser='r2': use one of deepseek_r1, qwen3"):
        make_llm(thinker, reasoning_parser="r2")


def _greedy(llm, prompt, **kw) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, **kw)
    return list(llm.generate([{"prompt_token_ids": prompt}], params,
                             use_tqdm=False)[0].outputs[0].token_ids)


BIASES = [2 + i / 4 for i in range(40)]  # the tiny model's </think> logit is a few below


def _ends_reasoning_at(llm, prompt, at_least: int = 2) -> tuple[float, list[int]]:
    """A logit_bias on </think> under which the unconstrained greedy reply closes its
    reasoning after `at_least` tokens or more, and that reply."""
    for bias in BIASES:
        ids = _greedy(llm, prompt, logit_bias={513: bias})
        if 513 in ids[at_least:12] and 513 not in ids[:at_least]:
            return bias, ids
    raise AssertionError("no bias made the tiny model close its reasoning mid-reply")


REGEX = "[a-z]{2,6}"


def _text(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True)  # (a completed grammar ends with </s>)


def test_structured_output_starts_after_the_reasoning(thinker, prompts):
    """deepseek_r1: the reasoning is what the unconstrained model writes, token for token;
    after </think> the reply follows the regex. A prompt that closed the reasoning itself
    (Qwen3's enable_thinking=False) is constrained from the first token."""
    llm = make_llm(thinker, reasoning_parser="deepseek_r1")
    tok = llm.get_tokenizer()
    bias, free = _ends_reasoning_at(llm, prompts[1])
    k = free.index(513)
    regex = StructuredOutputsParams(regex=REGEX)
    got = _greedy(llm, prompts[1], logit_bias={513: bias}, structured_outputs=regex)
    assert got[:k + 1] == free[:k + 1]
    assert re.fullmatch(REGEX, _text(tok, got[k + 1:])), _text(tok, got)
    assert not re.fullmatch(REGEX, _text(tok, got[:k]))  # the reasoning was not held to it
    closed = _greedy(llm, prompts[1] + [512, 513], logit_bias={513: 100.0},
                     structured_outputs=regex)
    assert 513 not in closed and re.fullmatch(REGEX, _text(tok, closed))
    plain = make_llm(thinker)  # without the parser the grammar holds from the first token
    out = _greedy(plain, prompts[1], logit_bias={513: bias}, structured_outputs=regex)
    assert 513 not in out and re.fullmatch(REGEX, _text(tok, out))


def test_qwen3_reply_may_open_with_the_tag(thinker, prompts):
    """qwen3: the first token is <think> or one the grammar allows. Not opened: the whole
    reply follows the grammar; opened: what follows is reasoning, unconstrained."""
    llm = make_llm(thinker, reasoning_parser="qwen3")
    tok = llm.get_tokenizer()
    regex = StructuredOutputsParams(regex=REGEX)
    direct = _greedy(llm, prompts[2], structured_outputs=regex)
    assert re.fullmatch(REGEX, _text(tok, direct))
    opened = _greedy(llm, prompts[2], logit_bias={512: 100.0}, structured_outputs=regex)
    free = _greedy(llm, prompts[2], logit_bias={512: 100.0})
    assert opened[0] == 512 and opened == free


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|><think>{% endif %}")


def test_server_splits_replies(thinker, prompts):
    """`loraplex serve --reasoning-parser deepseek_r1` (R1's way: the template opens the
    thinking): the message's reasoning and content are the raw completion's two sides of
    </think>, streamed or not; with a regex, the content follows it."""
    from tests.server_utils import RemoteServer

    args = ["--served-model-name", "thinker", "--dtype", "float32", "--max-model-len", "128",
            "--cpu-kv-cache-gib", "0.05", "--reasoning-parser", "deepseek_r1",
            "--chat-template", CHAT_TEMPLATE]
    messages = [{"role": "user", "content": "What is two and two?"}]
    with RemoteServer(thinker, args) as server:
        client = server.get_client()
        prompt = server.post("/tokenize", {"model": "thinker", "messages": messages}
                             ).json()["tokens"]
        for bias in BIASES:
            raw = client.completions.create(model="thinker", prompt=prompt, max_tokens=16,
                                            temperature=0, logit_bias={"513": bias},
                                            extra_body={"ignore_eos": True}).choices[0].text
            if "</think>" in raw[2:]:
                break
        assert "</think>" in raw[2:], raw
        reasoning, _, content = raw.partition("</think>")
        kw = dict(model="thinker", messages=messages, max_tokens=16, temperature=0,
                  logit_bias={"513": bias}, extra_body={"ignore_eos": True})
        res = client.chat.completions.create(**kw, logprobs=True)
        msg = res.choices[0].message
        assert (msg.content, msg.reasoning_content, msg.model_extra["reasoning"]) == (
            content or None, reasoning, reasoning)
        # usage: the reasoning took the tokens before </think> (R1's template opened it)
        tokens = [t.token for t in res.choices[0].logprobs.content]
        assert res.usage.completion_tokens_details.reasoning_tokens == tokens.index("</think>")
        usage = list(client.chat.completions.create(
            **kw, stream=True, stream_options={"include_usage": True}))[-1].usage
        assert usage.completion_tokens_details == res.usage.completion_tokens_details
        streamed = {"reasoning_content": "", "reasoning": "", "content": ""}
        for chunk in client.chat.completions.create(**kw, stream=True):
            delta = chunk.choices[0].delta.model_dump()
            for key in streamed:
                streamed[key] += delta.get(key) or ""
        assert streamed == {"reasoning_content": reasoning, "reasoning": reasoning,
                            "content": content}
        # vLLM's include_reasoning=false: the content alone, the reasoning still counted
        hidden = {**kw, "extra_body": {"ignore_eos": True, "include_reasoning": False}}
        res = client.chat.completions.create(**hidden)
        msg = res.choices[0].message
        assert (msg.content, msg.reasoning_content, msg.model_extra["reasoning"]) == (
            content or None, None, None)
        assert res.usage.completion_tokens_details.reasoning_tokens == tokens.index("</think>")
        deltas = [c.choices[0].delta.model_dump()
                  for c in client.chat.completions.create(**hidden, stream=True)]
        assert "".join(d.get("content") or "" for d in deltas) == content
        assert not any(d.get("reasoning") or d.get("reasoning_content") for d in deltas)
        msg = client.chat.completions.create(
            **{**kw, "extra_body": {"ignore_eos": True, "structured_outputs": {
                "regex": REGEX}}}).choices[0].message
        assert msg.reasoning_content == reasoning and re.fullmatch(REGEX, msg.content)
        tool = {"type": "function", "function": {"name": "add", "parameters": {
            "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}
        msg = client.chat.completions.create(
            **{**kw, "max_tokens": 40}, tools=[tool],
            tool_choice={"type": "function", "function": {"name": "add"}}).choices[0].message
        assert msg.reasoning_content == reasoning and msg.tool_calls[0].function.name == "add"
        assert set(json.loads(msg.tool_calls[0].function.arguments)) == {"a"}
        # the Responses API: a reasoning item, then the message; streamed alike
        rkw = dict(model="thinker", input=messages, max_output_tokens=16, temperature=0,
                   extra_body={"ignore_eos": True, "logit_bias": {"513": bias}})
        r = client.responses.create(**rkw)
        assert r.usage.output_tokens_details.reasoning_tokens == tokens.index("</think>")
        assert [item.type for item in r.output] == ["reasoning", "message"][:1 + bool(content)]
        assert r.output[0].content[0].text == reasoning and r.output_text == content
        events = list(client.responses.create(**rkw, stream=True))
        assert "".join(e.delta for e in events
                       if e.type == "response.reasoning_text.delta") == reasoning
        assert events[-1].response.output_text == content


def test_reasoning_token_count(thinker):
    """The tokens a reply's reasoning took: up to </think> (R1), through a character split
    over two byte tokens at its end; none for a qwen3 reply without <think>."""
    from transformers import AutoTokenizer

    from loraplex.reasoning import reasoning_token_count

    tok = AutoTokenizer.from_pretrained(str(thinker))
    ids = tok.encode("hmm, 2 + 2 é</think>It is 4.", add_special_tokens=False)
    assert tok.decode(ids[:ids.index(513) - 1]).endswith("\ufffd")  # é: two tokens
    assert reasoning_token_count(R1, ids, tok.decode) == ids.index(513)
    assert reasoning_token_count(QWEN3, ids, tok.decode) == 0
    assert reasoning_token_count(R1, [], tok.decode) == 0


def test_mistral_server_keeps_the_tags(magistral):
    """`--reasoning-parser mistral`: [THINK] and [/THINK] are special tokens, kept in the
    decoded reply, so the split finds them; streamed, the deltas add up to the message."""
    from tests.server_utils import RemoteServer

    args = ["--served-model-name", "magistral", "--dtype", "float32", "--max-model-len",
            "128", "--cpu-kv-cache-gib", "0.05", "--reasoning-parser", "mistral"]
    messages = [{"role": "user", "content": "What is two and two?"}]
    with RemoteServer(magistral, args) as server:
        client = server.get_client()
        kw = dict(model="magistral", messages=messages, max_tokens=2, temperature=0,
                  logit_bias={"512": 100})  # the model says [THINK], twice
        msg = client.chat.completions.create(**kw).choices[0].message
        assert (msg.reasoning_content, msg.content) == ("[THINK]", None)
        # a whole reply, made with guided_choice (its tags as plain text: the special tokens
        # are banned, else the grammar's first token may be [THINK], which starts reasoning)
        kw = dict(model="magistral", messages=messages, max_tokens=40, temperature=0,
                  logit_bias={"512": -100, "513": -100},
                  extra_body={"guided_choice": ["[THINK]2 + 2[/THINK]It is 4."]})
        msg = client.chat.completions.create(**kw).choices[0].message
        assert (msg.reasoning_content, msg.content) == ("2 + 2", "It is 4.")
        streamed = {"reasoning_content": "", "content": ""}
        for chunk in client.chat.completions.create(**kw, stream=True):
            delta = chunk.choices[0].delta.model_dump()
            for key in streamed:
                streamed[key] += delta.get(key) or ""
        assert streamed == {"reasoning_content": "2 + 2", "content": "It is 4."}



SEED, MINIMAX = REASONING_PARSERS["seed_oss"], REASONING_PARSERS["minimax_m2"]
APPEND, DSV3 = REASONING_PARSERS["minimax_m2_append_think"], REASONING_PARSERS["deepseek_v3"]
MORE_SPLITS = {SEED: [
    ("<seed:think>hmm</seed:think>It is 4.", ("hmm", "It is 4.")),
    ("hmm</seed:think>It is 4.", ("hmm", "It is 4.")),  # opened in the prompt
    ("cut off </seed:thi", ("cut off </seed:thi", "")), ("<think>x</think>", ("<think>x</think>", "")),
], MINIMAX: [
    ("<think>hmm</think>It is 4.", ("hmm", "It is 4.")), ("hmm</think>4", ("hmm", "4")),
    ("still thinking", ("still thinking", "")),
], APPEND: [
    ("hmm</think>It is 4.", (None, "<think>hmm</think>It is 4.")), ("", (None, "<think>")),
]}


@pytest.mark.parametrize(("parser", "reply", "split"), [
    (parser, reply, split) for parser, cases in MORE_SPLITS.items() for reply, split in cases],
    ids=lambda v: getattr(v, "name", None))
def test_split_seed_oss_and_minimax(parser, reply, split):
    """vLLM's seed_oss and minimax_m2 split as deepseek_r1 does (their own tags);
    minimax_m2_append_think keeps the thinking in the content, <think> put back."""
    assert parser.split(reply) == split
    sent = ("", "")
    for n in range(len(reply) + 1):  # prefix-stable, as every parser
        reasoning, content = parser.split(reply[:n], n == len(reply))
        assert (reasoning or "").startswith(sent[0]) and content.startswith(sent[1]), n
        sent = (reasoning or "", content)


def test_deepseek_v3_thinks_when_the_request_says_so():
    """vLLM's deepseek_v3: R1's split with chat_template_kwargs {"thinking": true}, else
    the reply is all content (identity); the other parsers are the same for any request."""
    assert DSV3.for_request({"thinking": True}) is R1
    for kwargs in (None, {}, {"thinking": False}, {"enable_thinking": True}):
        assert DSV3.for_request(kwargs) is None
    assert QWEN3.for_request({"thinking": True}) is QWEN3
    assert REASONING_PARSERS["openai_gptoss"].for_request(None) is not None
    assert APPEND.tag_ids(None) is None  # structured outputs: the whole reply


def test_the_prompt_may_open_the_reasoning():
    """DeepSeek-V3.1's template with thinking writes <think> last: the reply thinks from
    its first token (engine: structured outputs wait for </think>)."""
    from loraplex.reasoning import reasoning_opened

    start, end = 7, 8
    assert reasoning_opened([1, end, 2, start, 5], start, end)
    assert not reasoning_opened([1, start, 2, end, 3], start, end)
    assert not reasoning_opened([1, 2, 3], start, end)
