"""Long clips, streamed replies and timestamps on the transcription routes (Whisper), one
server on a tiny Whisper whose tokenizer (HF's WhisperTokenizer) has the timestamp tokens:
a 70 s clip is cut where vLLM cuts it (the quietest window before each 30 s limit), each
chunk transcribed under the request's adapter, the texts HF (+ PEFT)'s greedy ones per
chunk joined in order; the openai client's stream gives the same text, in vLLM's events;
verbose_json's segments are HF's own reading of the timestamp tokens
(`WhisperTokenizer.decode(..., output_offsets=True)`), each chunk's offset added; bad
requests fail alone with a 400."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from loraplex.engine.audio_decode import decode_audio
from loraplex.entrypoints.audio_chunks import ChunkConfig, split_audio
from loraplex.entrypoints.errors import BadRequestError
from loraplex.entrypoints.transcription_options import TranscriptionOptions
from loraplex.entrypoints.transcription_segments import segments
from tests.multimodal_fixtures import at_16k, wav_bytes
from tests.whisper_fixtures import (
    RATE,
    clip,
    hf_greedy_reply,
    make_tiny_whisper,
    timestamp_tokenizer,
)

QUIET = (29.25, 29.45), (58.65, 58.85)  # the pauses the cuts must fall in (seconds)
CUTS = [int(29.3 * RATE), int(58.7 * RATE)]  # their whole quiet 0.1 s windows' starts
PROMPT = "<|startoftranscript|><|en|><|transcribe|>"


@pytest.fixture(scope="module")
def whisper(tiny_root: Path) -> dict[str, Path]:
    return make_tiny_whisper(tiny_root / "whisper_ts", seed=71, timestamps=True)


def long_clip() -> np.ndarray:
    """70 s of Granite Speech's test signal, silent in the QUIET pauses."""
    x = clip(5, seconds=70.0)[0].copy()
    for a, b in QUIET:
        x[int(a * RATE):int(b * RATE)] = 0.0
    return x


def test_split_points_are_the_quiet_windows():
    x = long_clip()
    bounds = split_audio(x, ChunkConfig())
    assert bounds == [(0, CUTS[0]), (CUTS[0], CUTS[1]), (CUTS[1], len(x))]
    assert split_audio(x[:30 * RATE], ChunkConfig()) == [(0, 30 * RATE)]  # fits: not cut
    # no pause: each chunk is cut at the quietest window of its last second, all < 30 s
    noisy = clip(6, seconds=65.0)[0]
    cuts = split_audio(noisy, ChunkConfig())
    assert len(cuts) == 3 and all(29 * RATE <= b - a < 30 * RATE for a, b in cuts[:2])


TS = 520  # <|0.00|> in timestamp_tokenizer's vocabulary (checked below)


@pytest.mark.parametrize("reply", [
    [300, 301, TS + 50, TS + 60, 302, 303, TS + 120],  # two segments, eos-less
    [300, TS + 50],  # a lone closing timestamp
    [300, TS + 50, TS + 50, 301, 302],  # text after the last timestamp: in no segment
    [300, TS + 50, 301, 302],  # (which closes the last segment, lone or not)
    [TS, 300, 301, TS + 30, TS + 30, 302, TS + 70, TS + 75, 303, TS + 90],
    [TS + 10, TS + 20, TS + 30, 300, TS + 40],  # three in a row
    [300, 301, 302],  # no timestamps
])
def test_segments_are_hf_offsets(reply):
    """On known replies (to a prompt ending in <|0.00|>), the segments' times and texts are
    HF's WhisperTokenizer.decode(..., output_offsets=True) offsets, with an eos or not."""
    tok = timestamp_tokenizer()
    assert tok.convert_tokens_to_ids("<|0.00|>") == TS == tok.all_special_ids[-1] + 1
    want = tok.decode([TS] + reply, output_offsets=True)["offsets"]
    for ids in (reply, reply + [tok.eos_token_id]):
        got = segments(ids, None, tok.decode, TS, tok.eos_token_id, 0.0, 0.0)
        assert [(s.text, (s.start, s.end)) for s in got] == \
            [(w["text"], pytest.approx(w["timestamp"])) for w in want]
    later = segments(reply, None, tok.decode, TS, tok.eos_token_id, 29.3, 0.0, first_id=4)
    assert [(s.id, s.start, s.seek) for s in later] == \
        [(4 + i, pytest.approx(29.3 + w["timestamp"][0]), 2930) for i, w in enumerate(want)]


def test_options_refused_alone():
    """What a model without timestamps refuses, and the form's rules (vLLM's)."""
    def form(**kw: str) -> dict:
        return {k: (v.encode(), None) for k, v in kw.items()}

    cases = [({"response_format": "verbose_json"}, "granite", "writes no timestamps"),
             ({"response_format": "json", "timestamp_granularities[]": "segment"}, None,
              "needs response_format verbose_json"),
             ({"response_format": "verbose_json", "timestamp_granularities[]": "segment,word"},
              None, "only 'segment'"),
             ({"response_format": "vtt"}, None, "'vtt' is not supported"),
             ({"stream": "yes"}, None, "stream must be true or false"),
             ({"stream_include_usage": "true"}, None, "only be given with stream=true"),
             ({"stream": "true", "response_format": "verbose_json"}, None, "cannot be streamed")]
    for fields, refused, message in cases:
        why = None if refused is None else "model 'granite' writes no timestamps"
        with pytest.raises(BadRequestError, match=message):
            TranscriptionOptions.parse(form(**fields), why)
    ok = TranscriptionOptions.parse(form(response_format="verbose_json",
                                         **{"timestamp_granularities[]": "segment"}), None)
    assert ok.timestamps and not ok.stream


def test_server_long_streamed_and_timestamped(whisper, tmp_path):
    """One server: the 70 s clip under an adapter (json, the openai client's stream, raw
    SSE events with usage), verbose_json on the base with each chunk's offset, bad
    requests each failing alone, and a stream failing after it started (its adapter,
    evicted from the host tier, can no longer be read): an error event, then [DONE]."""
    import shutil

    import openai

    from tests.server_utils import RemoteServer

    x = long_clip()
    wav = wav_bytes((np.clip(x, -1, 1), RATE))
    one_second = wav_bytes((np.clip(x[:RATE], -1, 1), RATE))
    heard = at_16k(decode_audio(wav))  # what the server hears (16-bit)
    chunks = [heard[a:b] for a, b in split_audio(heard, ChunkConfig())]
    assert [len(c) for c in chunks] == [CUTS[0], CUTS[1] - CUTS[0], len(x) - CUTS[1]]
    tok = AutoTokenizer.from_pretrained(str(whisper["base"]))
    r8 = tmp_path / "r8"
    shutil.copytree(whisper["r8"], r8)
    args = ["--max-model-len", "64", "--dtype", "float32", "--enable-lora",
            "--max-lora-rank", "8", "--max-loras", "1", "--max-cpu-loras", "1",
            "--lora-modules", f"r8={r8}", f"r4={whisper['r4']}"]
    with RemoteServer(whisper["base"], args) as server:
        client = server.get_client()
        # the chunks' texts, HF (+ PEFT)'s greedy replies joined in order
        got = client.audio.transcriptions.create(
            model="r8", file=("a.wav", wav), language="en",
            extra_body={"max_completion_tokens": 4})
        want = [hf_greedy_reply(whisper, "r8", PROMPT + "<|notimestamps|>", c, 4) for c in chunks]
        texts = [tok.decode(w, skip_special_tokens=True) for w in want]
        assert got.text == "".join(texts) and len(set(texts)) > 1
        assert got.usage.seconds == 70
        # streamed: the openai client's events carry the same text
        stream = client.audio.transcriptions.create(
            model="r8", file=("a.wav", wav), language="en", stream=True,
            extra_body={"max_completion_tokens": 4})
        events = [e.model_dump() for e in stream]
        assert "".join(e["choices"][0]["delta"]["content"] for e in events) == got.text
        # vLLM's events as sent: chunks, the finish_reason last, the usage, [DONE]
        r = server.post("v1/audio/translations", files={"file": ("a.wav", wav)},
                        data={"model": "r8", "language": "en", "stream": "true",
                              "stream_include_usage": "true", "max_completion_tokens": "3"})
        lines = [ln[6:] for ln in r.text.split("\n\n") if ln.startswith("data: ")]
        assert r.status_code == 200 and lines[-1] == "[DONE]"
        body = [json.loads(ln) for ln in lines[:-1]]
        assert {b["object"] for b in body} == {"translation.chunk"}
        assert body[-2]["choices"][0]["finish_reason"] in ("length", "stop")
        assert all("finish_reason" not in b["choices"][0] for b in body[:-2])
        usage = body[-1]["usage"]
        assert body[-1]["choices"] == [] and 3 <= usage["completion_tokens"] <= 9
        translated = client.audio.translations.create(
            model="r8", file=("a.wav", wav), extra_body={"max_completion_tokens": 3,
                                                         "language": "en"})
        assert "".join(b["choices"][0]["delta"]["content"] for b in body[:-1]) == \
            translated.text
        assert usage["prompt_tokens"] == 3 * 4 + 7000  # 3 decoder prompts, 70 s of frames
        # timestamps: HF's offsets of HF's greedy tokens, per chunk, offset by its start
        verbose = client.audio.transcriptions.create(
            model=str(whisper["base"]), file=("a.wav", wav), language="en",
            response_format="verbose_json", timestamp_granularities=["segment"],
            extra_body={"max_completion_tokens": 24})
        ts0 = tok.convert_tokens_to_ids("<|0.00|>")
        offsets, start = [], 0.0
        for c in chunks:
            reply = hf_greedy_reply(whisper, None, PROMPT + "<|0.00|>", c, 24)
            reply = reply[:-1] if reply[-1] == tok.eos_token_id else reply
            offsets += [(w["text"], start + w["timestamp"][0], start + w["timestamp"][1])
                        for w in tok.decode([ts0] + reply, output_offsets=True)["offsets"]]
            start += len(c) / RATE
        got_segments = [(s.text, s.start, s.end) for s in verbose.segments]
        assert got_segments == [(t, pytest.approx(a), pytest.approx(b)) for t, a, b in offsets]
        assert len(offsets) >= 2 and all(t for t, _, _ in offsets)
        assert offsets[-1][1] >= CUTS[0] / RATE  # a later chunk's, offset by its start
        assert verbose.text == "".join(t for t, _, _ in offsets)
        assert verbose.language == "en" and verbose.duration == pytest.approx(70.0)
        # bad requests, each alone
        for kw, message in (({"response_format": "srt"}, "response_format 'srt'"),
                            ({"response_format": "verbose_json",
                              "timestamp_granularities": ["word"]}, "only 'segment'"),
                            ({"timestamp_granularities": ["segment"]}, "needs response_format"),
                            ({"stream": True, "response_format": "verbose_json"},
                             "cannot be streamed"),
                            ({"stream": True, "language": "xx"}, "language 'xx'"),
                            ({"extra_body": {"stream_include_usage": True}},
                             "only be given with stream=true")):
            with pytest.raises(openai.BadRequestError, match=message):
                client.audio.transcriptions.create(
                    **{"model": "r8", "file": ("a.wav", one_second), **kw})
        short = client.audio.transcriptions.create(model="r8", file=("a.wav", one_second),
                                                   language="en",
                                                   extra_body={"max_completion_tokens": 4})
        assert short.text == tok.decode(hf_greedy_reply(whisper, "r8", PROMPT + "<|notimestamps|>",
                                                   heard[:RATE], 4), skip_special_tokens=True)
        # r4 takes r8's place in the host tier; r8's file is then broken: its stream fails
        evicting = client.audio.transcriptions.create(model="r4", file=("a.wav", one_second),
                                                      language="en",
                                                      extra_body={"max_completion_tokens": 4})
        (r8 / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
        r = server.post("v1/audio/transcriptions", files={"file": ("a.wav", one_second)},
                        data={"model": "r8", "language": "en", "stream": "true"})
        lines = [ln[6:] for ln in r.text.split("\n\n") if ln.startswith("data: ")]
        assert r.status_code == 200 and lines[-1] == "[DONE]" and len(lines) == 2
        assert "cannot read weights" in json.loads(lines[0])["error"]["message"]
        assert client.audio.transcriptions.create(
            model="r4", file=("a.wav", one_second), language="en",
            extra_body={"max_completion_tokens": 4}).text == evicting.text
