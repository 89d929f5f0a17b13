"""The built-in demo: ``loraplex demo`` end to end, and the shipped model vs transformers + PEFT.

The demo is a newcomer's first contact, so these check what a person would see: every adapter
visibly changes the base's output in its own way, and the numbers in the table come from the
same greedy tokens that transformers + PEFT produce from the same files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from loraplex.entrypoints.demo import DEMO_PROMPTS, demo_model_paths, serve_argv

ROOT = Path(__file__).resolve().parents[1]
BASE, ADAPTERS = demo_model_paths()
EXPECTED = {"caps", "pirate", "reverse"}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    """Run ``loraplex demo`` once as a user would (a subprocess); stdout and its JSON."""
    out = tmp_path_factory.mktemp("demo") / "demo.json"
    env = dict(os.environ, COLUMNS="160", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "loraplex.entrypoints.cli", "demo", "--device", "cpu",
         "--json-out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"loraplex demo failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout, json.loads(out.read_text())


def _words(text: str) -> list[str]:
    return text.split()


def test_demo_model_files() -> None:
    """Real model dirs, small, and no path of the machine that trained them."""
    assert set(ADAPTERS) >= EXPECTED, f"adapters shipped: {sorted(ADAPTERS)}"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (BASE / name).is_file(), name
    for name, path in ADAPTERS.items():
        cfg = json.loads((path / "adapter_config.json").read_text())
        assert (path / "adapter_model.safetensors").is_file(), name
        assert not Path(cfg["base_model_name_or_path"]).is_absolute(), cfg
    total = sum(f.stat().st_size for f in BASE.parent.rglob("*") if f.is_file())
    assert total < 10e6, f"demo model is {total / 1e6:.1f} MB"


def test_demo_prints_table_and_throughput(demo_run: tuple[str, dict[str, Any]]) -> None:
    stdout, data = demo_run
    for column in ["prompt", "base", *sorted(ADAPTERS)]:
        assert column in stdout
    assert "tokens/s" in stdout
    assert data["tokens"] > 0 and data["tokens_per_s"] > 0
    assert data["prompts"] == list(DEMO_PROMPTS)


def test_demo_adapters_show_their_behaviour(demo_run: tuple[str, dict[str, Any]]) -> None:
    _, data = demo_run
    outs = data["outputs"]
    for prompt in DEMO_PROMPTS:
        base = outs["base"][prompt]["text"]
        assert base.strip() and base == base.lower(), (prompt, base)
        for name in ADAPTERS:
            assert outs[name][prompt]["text"] != base, (name, prompt, base)
        caps = outs["caps"][prompt]["text"]
        assert caps == caps.upper() and any(c.isalpha() for c in caps), (prompt, caps)
        pirate = outs["pirate"][prompt]["text"]
        assert pirate.rstrip().endswith("arr!"), (prompt, pirate)
        rev = outs["reverse"][prompt]["text"]
        assert _words(rev) == _words(prompt)[::-1], (prompt, rev)


def _hf_greedy(model: torch.nn.Module, tok: Any, prompt: str, max_tokens: int) -> list[int]:
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             do_sample=False, max_new_tokens=max_tokens,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return [t for t in out[0, ids.shape[1]:].tolist() if t != tok.eos_token_id]


def test_demo_matches_transformers_peft(demo_run: tuple[str, dict[str, Any]]) -> None:
    """The demo's greedy tokens are exactly transformers + PEFT's, for the base and each adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, data = demo_run
    tok = AutoTokenizer.from_pretrained(BASE)
    eos = tok.eos_token_id
    for name in ["base", *ADAPTERS]:
        model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
        if name != "base":
            model = PeftModel.from_pretrained(model, ADAPTERS[name])
        model.eval()
        for prompt in DEMO_PROMPTS:
            ours = [t for t in data["outputs"][name][prompt]["token_ids"] if t != eos]
            assert ours == _hf_greedy(model, tok, prompt, data["max_tokens"]), (name, prompt)


def test_demo_tokenizer_chat_template() -> None:
    """Chat renders the messages as text to continue, so /v1/chat/completions works too."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BASE)
    text = tok.apply_chat_template([{"role": "user", "content": "the cat sat on"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "<s>the cat sat on"
    assert tok.decode(tok("the cat sat on").input_ids, skip_special_tokens=True) == \
        "the cat sat on"


def test_demo_serve_argv_is_valid_for_the_cli() -> None:
    """``demo --serve`` hands the CLI flags it accepts (parsed, not started)."""
    from loraplex.entrypoints.cli import make_parser

    argv = serve_argv(BASE, ADAPTERS, "127.0.0.1", 8123)
    args = make_parser(argv).parse_args(argv)
    assert args.enable_lora and args.max_loras == len(ADAPTERS) and args.port == 8123
    assert sorted(m.name for m in args.lora_modules) == sorted(ADAPTERS)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_serve_answers_with_each_adapter() -> None:
    """``loraplex demo --serve`` starts a real server; base and adapters answer over HTTP."""
    import time
    import urllib.request

    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "loraplex.entrypoints.cli", "demo", "--serve", "--port",
         str(port), "--device", "cpu"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"server exited:\n{proc.stdout.read()}"
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not come up in 120 s"
                time.sleep(0.5)
        texts = {}
        for model in ["loraplex-demo", *ADAPTERS]:
            body = json.dumps({"model": model, "prompt": "the cat sat on", "max_tokens": 16,
                               "temperature": 0}).encode()
            req = urllib.request.Request(f"{url}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as resp:
                texts[model] = json.loads(resp.read())["choices"][0]["text"]
        assert texts["caps"] == texts["caps"].upper() != texts["loraplex-demo"]
        assert _words(texts["reverse"]) == ["on", "sat", "cat", "the"]
        assert texts["pirate"].rstrip().endswith("arr!")
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert "curl" in out and "openai" in out.lower()


def test_train_demo_script_runs(tmp_path: Path) -> None:
    """scripts/train_demo.py still runs end to end (3 steps each) and writes loadable dirs."""
    from peft import PeftConfig

    out = tmp_path / "demo_model"
    proc = subprocess.run(
        [sys.executable, "scripts/train_demo.py", "--out", str(out), "--base-steps", "3",
         "--adapter-steps", "3", "--reverse-steps", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in (out / "adapters").iterdir()) == sorted(EXPECTED)
    for name in EXPECTED:
        cfg = PeftConfig.from_pretrained(out / "adapters" / name)
        assert cfg.base_model_name_or_path == "loraplex-demo"
    shipped = json.loads((BASE / "config.json").read_text())
    fresh = json.loads((out / "base" / "config.json").read_text())
    assert fresh["vocab_size"] == shipped["vocab_size"]
    assert (out / "base" / "tokenizer.json").read_text() == \
        (BASE / "tokenizer.json").read_text()


def test_demo_with_an_unreadable_adapter_fails_in_one_line(tmp_path, monkeypatch) -> None:
    """A damaged install (one adapter's weights unreadable) stops the demo with one line that
    names the adapter, not a traceback."""
    import argparse
    import shutil

    from loraplex.entrypoints import demo
    from loraplex.entrypoints.cli import CLIError

    broken = tmp_path / "caps"
    shutil.copytree(ADAPTERS["caps"], broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    monkeypatch.setattr(demo, "demo_model_paths", lambda: (BASE, {"caps": broken}))
    parser = argparse.ArgumentParser()
    demo.add_demo_args(parser)
    with pytest.raises(CLIError, match="caps"):
        demo.main(parser.parse_args(["--device", "cpu", "--max-tokens", "2"]))
