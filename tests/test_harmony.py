"""gpt-oss's harmony replies: the split into analysis (reasoning), final text and tool
calls (prefix-stable, so streamed deltas add up to the message), the `openai` tool
parser, and a real server for a tiny gpt-oss whose tokenizer has harmony's markers as
special tokens: the reasoning parser is on by default, as in vLLM; replies made harmony
with guided_choice (structured outputs constrain the whole reply of a model without
end-of-reasoning tag) come back split, streamed or not, as chat and as a response."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraplex.entrypoints.tool_parsers import OpenAIParser
from loraplex.harmony import HarmonyReasoningParser, messages, tool_call_text
from tests.fixtures import add_tokens_to_model, make_tiny_model
from tests.test_tool_calls import streamed_calls

HARMONY = HarmonyReasoningParser()
CALL = '{"city": "Paris", "days": 3}'
REPLIES = {  # name -> (reply, reasoning, the rest: content, then canonical calls)
    "final": ("<|channel|>analysis<|message|>They ask about weather.<|end|>"
              "<|start|>assistant<|channel|>final<|message|>It is sunny.",
              "They ask about weather.", "It is sunny."),
    "call in the channel": (
        "<|channel|>analysis<|message|>Need the tool.<|end|><|start|>assistant<|channel|>"
        f"commentary to=functions.get_weather <|constrain|>json<|message|>{CALL}",
        "Need the tool.", tool_call_text("get_weather", CALL)),
    "call after the role": (
        "<|channel|>analysis<|message|>x<|end|><|start|>assistant to=functions.get_weather"
        f"<|channel|>commentary json<|message|>{CALL}", "x", tool_call_text("get_weather", CALL)),
    "preamble, then a call": (
        "<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant<|channel|>"
        f"commentary to=functions.get_weather<|message|>{CALL}", None,
        "Checking." + tool_call_text("get_weather", CALL)),
    "two analyses": ("<|channel|>analysis<|message|>a<|end|><|start|>assistant<|channel|>"
                     "analysis<|message|>b<|end|><|start|>assistant<|channel|>final"
                     "<|message|>c<|return|>", "ab", "c"),
    "no analysis": ("<|channel|>final<|message|>Hi.", None, "Hi."),
    "outside the format": ("Just text.", None, "Just text."),
    "header cut off": ("<|channel|>analysis<|message|>r<|end|><|start|>assistant<|chan",
                       "r", ""),
    "empty": ("", None, ""),
}
MARKERS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>",
           "<|constrain|>")


@pytest.mark.parametrize("name", list(REPLIES))
def test_split(name):
    reply, reasoning, rest = REPLIES[name]
    assert HARMONY.split(reply) == (reasoning, rest)
    assert HARMONY.split(rest) == (None, rest)  # what the tool parser reads again


def _pieces(text: str) -> list[str]:
    """The text as the model writes it: each marker at once, anything else by character."""
    out, i = [], 0
    while i < len(text):
        marker = next((m for m in MARKERS if text.startswith(m, i)), None)
        out.append(marker or text[i])
        i += len(marker or text[i])
    return out


@pytest.mark.parametrize("name", list(REPLIES))
def test_the_split_of_a_prefix_is_a_prefix_of_the_split(name):
    """Markers arrive whole (special tokens) or spelled out character by character (as
    structured outputs may write them): either way, no split of a partial reply takes
    back what an earlier one gave."""
    reply, reasoning, rest = REPLIES[name]
    for pieces in (_pieces(reply), list(reply)):
        seen = ""
        for piece in pieces:
            seen += piece
            r, c = HARMONY.split(seen, finished=False)
            assert r is None or (reasoning or "").startswith(r), (seen, r)
            assert rest.startswith(c), (seen, c)


def test_openai_tool_parser():
    parser = OpenAIParser()
    for _, _, rest in REPLIES.values():
        content, calls = parser.parse(rest)
        if "functions." in rest:
            assert [(c.function.name, c.function.arguments) for c in calls] == [
                ("get_weather", CALL)]
            assert content == (rest[:parser.content_prefix(rest)] or None)
        else:
            assert (content, calls) == (rest, [])
    # a raw reply (no reasoning parser before it): the analysis is left out
    content, calls = parser.parse(REPLIES["preamble, then a call"][0])
    assert content == "Checking." and calls[0].function.name == "get_weather"
    # streamed: the name once the header is complete, the arguments as they grow
    rest = REPLIES["call in the channel"][2]
    assert parser.partial(rest[:rest.index("<|message|>")]) == []
    assert parser.partial(rest[:-3]) == [("get_weather", CALL[:-3])]
    assert parser.content_prefix("Checking.<|sta") == len("Checking.")
    assert [m.channel for m in messages(REPLIES["two analyses"][0])] == [
        "analysis", "analysis", "final"]


TEMPLATE = ("{% if reasoning_effort %}<|start|>system<|message|>Reasoning: "
            "{{ reasoning_effort }}<|end|>{% endif %}"
            "{% for m in messages %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}"
            "<|end|>{% endfor %}{% if add_generation_prompt %}<|start|>assistant{% endif %}")
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}}}}}]
MESSAGES = [{"role": "user", "content": "Weather in Paris for 3 days?"}]


@pytest.fixture(scope="module")
def harmony_model(tiny_root: Path) -> Path:
    """A tiny gpt-oss whose tokenizer has harmony's markers as special tokens (513: the
    first, <|channel|>, to 516, <|return|>; 512 is <|start|>)."""
    path = make_tiny_model(tiny_root / "harmony", "gpt_oss", seed=98, intermediate_size=64)
    assert add_tokens_to_model(path, MARKERS, special=True, seed=99)[:5] == list(range(512, 517))
    return path


def _streamed(client, **kw) -> tuple[dict[str, str], list]:
    chunks = list(client.chat.completions.create(stream=True, **kw))
    text = {"reasoning_content": "", "content": ""}
    for chunk in chunks:
        delta = chunk.choices[0].delta.model_dump() if chunk.choices else {}
        for key in text:
            text[key] += delta.get(key) or ""
    return text, chunks


def test_server_splits_harmony_replies(harmony_model):
    """`loraplex serve` a gpt-oss (no --reasoning-parser: openai_gptoss by default) with
    --tool-call-parser openai: the analysis is the reasoning, the final message the
    content, a call to functions.get_weather a tool call; streamed alike; a reply the
    model writes freely is split as the raw completion of the same prompt reads."""
    from tests.server_utils import RemoteServer

    args = ["--served-model-name", "oss", "--dtype", "float32", "--max-model-len", "512",
            "--cpu-kv-cache-gib", "0.05", "--chat-template", TEMPLATE,
            "--enable-auto-tool-choice", "--tool-call-parser", "openai"]
    with RemoteServer(harmony_model, args) as server:
        client = server.get_client()
        kw = dict(model="oss", messages=MESSAGES, max_tokens=300, temperature=0)
        reply, reasoning, content = REPLIES["final"]
        forced = {**kw, "extra_body": {"guided_choice": [reply]}}
        res = client.chat.completions.create(**forced, logprobs=True)
        msg = res.choices[0].message
        assert (msg.reasoning_content, msg.content) == (reasoning, content)
        # usage: the tokens through the analysis message's last character
        tokens = [t.token for t in res.choices[0].logprobs.content]
        through = next(i + 1 for i in range(len(tokens))
                       if "".join(tokens[:i + 1]).endswith(reasoning))
        assert res.usage.completion_tokens_details.reasoning_tokens == through < len(tokens)
        assert _streamed(client, **forced)[0] == {"reasoning_content": reasoning,
                                                  "content": content}
        r = client.responses.create(model="oss", input=MESSAGES, max_output_tokens=300,
                                    temperature=0, extra_body={"guided_choice": [reply]})
        assert [i.type for i in r.output] == ["reasoning", "message"]
        assert r.output[0].content[0].text == reasoning and r.output_text == content

        reply, reasoning, _ = REPLIES["call in the channel"]
        calling = {**kw, "tools": TOOLS, "extra_body": {"guided_choice": [reply]}}
        choice = client.chat.completions.create(**calling).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.message.reasoning_content == reasoning
        assert [(c.function.name, json.loads(c.function.arguments))
                for c in choice.message.tool_calls] == [("get_weather", json.loads(CALL))]
        text, chunks = _streamed(client, **calling)
        assert text == {"reasoning_content": reasoning, "content": ""}
        assert [(n, a) for _, n, a in streamed_calls(chunks)] == [("get_weather", CALL)]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"

        # reasoning_effort reaches the template (the prompt's tokens show it)
        res = client.chat.completions.create(**kw | {"max_tokens": 1}, reasoning_effort="low",
                                             extra_body={"prompt_logprobs": 0})
        prompt_text = "".join(next(iter(p.values()))["decoded_token"]
                              for p in res.model_extra["prompt_logprobs"][1:])
        assert "Reasoning: low" in prompt_text, prompt_text

        # free replies (markers made likely): the chat route reads the raw completion
        prompt = server.post("/tokenize", {"model": "oss", "messages": MESSAGES}).json()["tokens"]
        raws = []
        for bias in (2, 3, 4, 5):
            free = {"logit_bias": {str(t): bias for t in range(513, 517)}}
            raw = client.completions.create(
                model="oss", prompt=prompt, max_tokens=24, temperature=0,
                extra_body={"skip_special_tokens": False}, **free).choices[0].text
            msg = client.chat.completions.create(**kw | {"max_tokens": 24},
                                                 **free).choices[0].message
            want = HARMONY.split(raw)
            assert (msg.reasoning_content, msg.content or "") == want, raw
            raws.append(raw)
        assert any("<|message|>" in raw for raw in raws), raws  # some message was read


def test_gpt_oss_reads_harmony_by_default(harmony_model, tiny_models):
    """As in vLLM, a gpt-oss base gets the openai_gptoss reasoning parser unless another
    one is named; other bases none."""
    from tests.engine_utils import make_llm

    assert make_llm(harmony_model).llm_engine.model_config.reasoning_parser == "openai_gptoss"
    assert make_llm(tiny_models["llama"]).llm_engine.model_config.reasoning_parser is None


def test_responses_reasoning_effort_is_the_chats():
    from loraplex.entrypoints.protocol import ResponsesRequest
    from loraplex.entrypoints.serving_responses import chat_request

    req = ResponsesRequest.model_validate({"model": "m", "input": "hi",
                                           "reasoning": {"effort": "high"}})
    assert chat_request(req).reasoning_effort == "high"
    assert chat_request(ResponsesRequest(model="m", input="hi")).reasoning_effort is None
