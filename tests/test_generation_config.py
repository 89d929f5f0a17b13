"""generation_config.json (vLLM's --generation-config): its eos ids end replies, its
sampling fields are the defaults of requests that leave them unset (offline and over
HTTP, where a seeded request without them samples as one that sets them), max_new_tokens
the default max_tokens; "vllm" ignores the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from loraplex import SamplingParams
from tests.engine_utils import make_llm

END_OF_TURN = 300  # an ordinary token of the tiny vocabulary, made a turn's end
DEFAULTS = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1,
            "max_new_tokens": 7}


@pytest.fixture(scope="module")
def chat_model(tiny_root: Path, tiny_models) -> Path:
    path = tiny_root / "generation_config"
    if not path.exists():
        shutil.copytree(tiny_models["llama"], path)
        (path / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 1, "eos_token_id": [2, END_OF_TURN], **DEFAULTS}))
    return path


def test_end_of_turn_stops_a_reply(chat_model, prompts):
    params = SamplingParams(temperature=0, max_tokens=8, logit_bias={END_OF_TURN: 100.0})
    out = make_llm(chat_model).generate([{"prompt_token_ids": prompts[0]}], params,
                                        use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [END_OF_TURN] and out.finish_reason == "stop"
    out = make_llm(chat_model, generation_config="vllm").generate(
        [{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 8 and out.finish_reason == "length"


def test_offline_defaults(chat_model, tiny_models, prompts, tmp_path):
    llm = make_llm(chat_model)
    p = llm.get_default_sampling_params()
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.max_tokens) == (
        0.6, 0.9, 20, 1.1, 7)
    out = llm.generate([{"prompt_token_ids": prompts[0]}], use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 7 or out.finish_reason == "stop"
    assert make_llm(chat_model, generation_config="vllm").get_default_sampling_params() \
        .temperature == 1.0
    # another folder's file; a folder without one is an error
    folder = tmp_path / "gen"
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.3}))
    assert make_llm(tiny_models["llama"], generation_config=str(folder)) \
        .get_default_sampling_params().temperature == 0.3
    with pytest.raises(ValueError, match="no generation_config.json there"):
        make_llm(tiny_models["llama"], generation_config=str(tmp_path))


def test_server_defaults(chat_model):
    from tests.server_utils import RemoteServer

    args = ["--served-model-name", "chat", "--dtype", "float32", "--max-model-len", "128",
            "--cpu-kv-cache-gib", "0.05"]
    messages = [{"role": "user", "content": "Tell me a story"}]
    with RemoteServer(chat_model, args) as server:
        client = server.get_client()

        def reply(**kw):
            r = client.chat.completions.create(model="chat", messages=messages, seed=5,
                                               extra_body={"ignore_eos": True, **kw})
            return r.choices[0].message.content, r.usage.completion_tokens
        unset = reply()
        assert unset[1] == 7  # max_new_tokens
        explicit = {k: v for k, v in DEFAULTS.items() if k != "max_new_tokens"}
        assert reply(max_tokens=7, **explicit) == unset
        assert reply(max_tokens=7, temperature=1.0, top_p=1.0, top_k=0,
                     repetition_penalty=1.0) != unset
