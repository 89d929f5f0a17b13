"""`loraplex` command line: help texts, and one clear line (no traceback) for bad input."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from loraplex.entrypoints.cli import main, make_parser, parse_human_int, parse_lora_module
from tests.fixtures import quantized_copy
from tests.server_utils import clean_env, free_port, serve_cmd

FLAGS = ["--enable-lora", "--lora-modules", "--max-loras", "--max-lora-rank", "--max-cpu-loras",
         "--lora-dtype", "--max-model-len", "--max-num-seqs", "--dtype", "--seed", "--host",
         "--port", "--served-model-name", "--chat-template", "--api-key",
         "--uvicorn-log-level", "--lora-extra-vocab-size", "--long-lora-scaling-factors",
         "--per-adapter-latency-metrics", "--lora-target-modules",
         "--enable-lora-modules-to-save"]


def run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return run_many([args], timeout)[0]


def run_many(commands: list[list[str]], timeout: float = 120
             ) -> list[subprocess.CompletedProcess]:
    """Each command run with the tests' env, output captured, all at once (each pays the
    imports: one after another, the CLI's start-up tests took the most time of the suite)."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=clean_env()) for c in commands]
    out = []
    try:
        for c, p in zip(commands, procs, strict=True):
            stdout, stderr = p.communicate(timeout=timeout)
            out.append(subprocess.CompletedProcess(c, p.returncode, stdout, stderr))
    finally:  # (a timeout: none left running, as subprocess.run leaves none)
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "loraplex.entrypoints.cli", *args]


def assert_one_line_error(res: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert res.returncode == code, (res.returncode, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    assert len(errors) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def _serve_parser():
    return make_parser(["serve"])._subparsers._group_actions[0].choices["serve"]


def test_help_lists_every_flag():
    top = run(cli("--help"))
    assert top.returncode == 0 and "serve" in top.stdout
    help_text = _serve_parser().format_help()
    for flag in FLAGS:
        assert flag in help_text, flag
    for action in _serve_parser()._actions:  # every flag says what it does
        assert action.help and len(action.help) > 10, action.option_strings


def test_usage_doc_lists_the_issue_flags():
    usage = (Path(__file__).parents[1] / "docs" / "usage.md").read_text()
    for flag in FLAGS:
        assert f"`{flag}" in usage, flag


def test_chunked_prefill_and_prefix_caching_flags():
    """vLLM's spellings (short ones too); the server's token budget defaults to vLLM's
    server value."""
    from loraplex.entrypoints.api_server import SERVER_MAX_NUM_BATCHED_TOKENS, _engine_args

    def engine_args(*flags):
        ns = _serve_parser().parse_args(["m", *flags])
        ns.model = ns.model_tag  # main() picks the positional or --model
        return _engine_args(ns)

    default = engine_args()
    assert default.max_num_batched_tokens == SERVER_MAX_NUM_BATCHED_TOKENS
    assert default.enable_chunked_prefill is None and default.enable_prefix_caching is None
    off = engine_args("--no-enable-chunked-prefill", "--no-enable-prefix-caching")
    assert off.enable_chunked_prefill is False and off.enable_prefix_caching is False
    assert off.max_num_batched_tokens is None  # then max(8192, max_model_len)
    assert engine_args("--max-num-batched-tokens", "512").max_num_batched_tokens == 512
    assert engine_args("--enable-prefix-caching").enable_prefix_caching is True
    # vLLM's short spellings
    assert engine_args("-q", "awq").quantization == engine_args("--quantization", "awq") \
        .quantization == "awq"
    assert engine_args("-tp", "1").tensor_parallel_size == 1


@pytest.mark.parametrize("args,needle", [
    (["--max-loras", "abc"], "--max-loras"),
    (["--bogus-flag"], "--bogus-flag"),
    (["--lora-modules", "no-equals-sign"], "name=path"),
    (["--lora-modules", '{"name": "x"}'], "path"),
    (["--dtype", "float8"], "--dtype"),
    (["--port", "99999"], "--port"),
    (["--long-lora-scaling-factors", "4,x"], "scaling factors"),
    (["--allowed-origins", "*"], "JSON list"),
])
def test_bad_flags_fail_fast(tmp_path, capsys, args, needle):
    with pytest.raises(SystemExit) as e:
        main(["serve", str(tmp_path), *args])
    err = capsys.readouterr().err
    res = subprocess.CompletedProcess([], e.value.code, "", err)
    assert_one_line_error(res, 2, needle)


def test_bad_flag_in_a_real_process():
    flag, model = run_many([cli("serve", "some-model", "--max-loras", "x"), cli("serve")])
    assert_one_line_error(flag, 2, "--max-loras")
    assert_one_line_error(model, 2, "MODEL")


def test_bad_startup_inputs_fail_with_one_line(tiny_models, tmp_path):
    base = str(tiny_models["llama"])

    def serve(model: str, *args: str) -> list[str]:
        return serve_cmd(model, "--port", str(free_port()), "--host", "127.0.0.1",
                         "--max-model-len", "64", *args)

    cases = [
        (serve(base, "--enable-lora", "--lora-modules", f"ghost={tmp_path / 'missing'}"),
         ("ghost", "does not exist")),
        # checked before the model is read: the missing adapter is named, not the model
        (serve(str(tmp_path / "no-model"), "--enable-lora", "--lora-modules",
               f"ghost={tmp_path / 'missing'}"), ("ghost", "does not exist")),
        (serve(base, "--lora-modules", f"a={tmp_path}"), ("--enable-lora",)),
        (serve(str(tmp_path / "no-model")), ("no-model",)),
        (serve(base, "--chat-template", "nope.jinja"), ("--chat-template",)),
        (serve(base, "--ssl-certfile", str(tmp_path / "cert.pem")),
         ("--ssl-certfile", "no such file")),
        (serve(base, "--ssl-keyfile", __file__), ("--ssl-keyfile needs --ssl-certfile",)),
    ]
    for res, (_, needles) in zip(run_many([c for c, _ in cases]), cases, strict=True):
        assert_one_line_error(res, 1, *needles)


def test_quantized_checkpoint_fails_with_one_line(tiny_models, tmp_path):
    model = quantized_copy(tiny_models["llama"], tmp_path / "hqq", "hqq")
    res = run(serve_cmd(str(model), "--port", str(free_port()), "--host", "127.0.0.1"))
    assert_one_line_error(res, 1, "quant_method='hqq'", "not supported yet")


def test_parse_lora_module():
    assert parse_lora_module("a=/x/y").path == "/x/y"
    m = parse_lora_module('{"name": "n", "path": "p", "base_model_name": "b"}')
    assert (m.name, m.path, m.base_model_name) == ("n", "p", "b")
    for bad in ("a", "=p", '{"name": 1', '{"name": "n", "path": "p", "extra": 1}'):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_lora_module(bad)


def test_parse_human_int():
    assert parse_human_int("2048") == 2048
    assert parse_human_int("4k") == 4000 and parse_human_int("4K") == 4096
    with pytest.raises(argparse.ArgumentTypeError):
        parse_human_int("lots")
