"""LLM.chat: each conversation through the chat template (the tokenizer's, or one given),
with vLLM's chat_template_kwargs and the template's own keywords reaching it."""

from __future__ import annotations

from transformers import AutoTokenizer

from tests.engine_utils import GREEDY, make_llm

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% if enable_thinking is false %}"
            "no thinking{% endif %}{% endif %}")


def test_chat_renders_each_conversation(tiny_models):
    base = tiny_models["llama"]
    tok = AutoTokenizer.from_pretrained(str(base))
    llm = make_llm(base)
    conversations = [[{"role": "user", "content": "Hello"}],
                     [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Tell me more"}]]
    for kwargs, variables in (({}, {}),
                              ({"chat_template_kwargs": {"enable_thinking": False}},
                               {"enable_thinking": False})):
        outs = llm.chat(conversations, GREEDY, use_tqdm=False, chat_template=TEMPLATE,
                        **kwargs)
        for conv, out in zip(conversations, outs, strict=True):
            text = tok.apply_chat_template(conv, chat_template=TEMPLATE, tokenize=False,
                                           add_generation_prompt=True, **variables)
            assert ("no thinking" in text) == bool(variables)
            assert out.prompt_token_ids == tok(text, add_special_tokens=False).input_ids
            assert len(out.outputs[0].token_ids) == GREEDY.max_tokens
