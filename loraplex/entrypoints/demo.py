"""``loraplex demo``: the built-in demo model and its adapters, offline, in one mixed batch.

The package ships a tiny Llama sentence-completer (``loraplex/demo_model/base``, trained by
``scripts/train_demo.py``) and three PEFT LoRA adapters that change its behaviour in ways a
person sees at a glance: ``caps`` (continues in ALL CAPS), ``pirate`` (continues in pirate
speak), ``reverse`` (says the prompt's words back in reverse). ``loraplex demo`` sends the
same prompts through the base and every adapter in ONE ``LLM.generate`` call, so what the
table shows is multi-LoRA batching itself; ``loraplex demo --serve`` starts the
OpenAI-compatible server on the same model with the adapters registered.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

DEMO_PROMPTS: tuple[str, ...] = (
    "the cat sat on",
    "my friend walked to",
    "the old man likes to",
    "a little bird can see",
)
# The demo model's KV cache needs little: 64 MiB holds 32k tokens (256 full 128-token sequences),
# and on a GPU it keeps the demo from taking 90% of the card's memory.
DEMO_KV_CACHE_BYTES = 64 * 2**20
# Descriptions shown under the table, so a newcomer knows what each column should do.
ADAPTER_BLURBS: dict[str, str] = {
    "caps": "continues in ALL CAPS",
    "pirate": "continues in pirate speak",
    "reverse": "says the prompt's words back in reverse order",
}


def demo_model_paths() -> tuple[Path, dict[str, Path]]:
    """The shipped demo base directory and {adapter name: adapter directory}, sorted by name.

    Uses the package's own files (pyproject ships ``loraplex/demo_model/**``), so it works
    from a source checkout and from an installed wheel alike, with no network.
    """
    root = Path(__file__).resolve().parent.parent / "demo_model"
    base = root / "base"
    if not (base / "config.json").is_file():
        raise FileNotFoundError(
            f"the demo model is missing from {root}; run 'python scripts/train_demo.py' "
            "in a source checkout to rebuild it")
    adapters_dir = root / "adapters"
    adapters = {p.name: p for p in sorted(adapters_dir.iterdir())
                if (p / "adapter_config.json").is_file()} if adapters_dir.is_dir() else {}
    return base, adapters


def _max_rank(adapters: dict[str, Path]) -> int:
    """The largest LoRA rank among the adapters: what max_lora_rank must allow."""
    ranks = [int(json.loads((p / "adapter_config.json").read_text()).get("r", 8))
             for p in adapters.values()]
    return max(ranks, default=8)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def add_demo_args(parser: argparse.ArgumentParser) -> None:
    """Register ``loraplex demo``'s flags (called by the CLI when it builds the subcommand)."""
    parser.add_argument("--serve", action="store_true",
                        help="Start the OpenAI-compatible server on the demo model with its "
                             "adapters registered, instead of the offline batch.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="With --serve: address to listen on.")
    parser.add_argument("--port", type=int, default=8000, help="With --serve: port.")
    parser.add_argument("--max-tokens", type=_positive_int, default=24,
                        help="Most tokens generated per prompt (greedy decoding).")
    parser.add_argument("--prompt", dest="prompts", action="append", default=None,
                        metavar="TEXT", help="A prompt to run (repeat the flag for more); "
                                             "default: four built-in sentence starts.")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N].")
    parser.add_argument("--json-out", type=Path, default=None, metavar="FILE",
                        help="Also write every output (text, token ids) and the timing as "
                             "JSON to FILE (used by the tests).")


add_cli_args = add_demo_args  # the name cli.make_demo_parser looks up


def main(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit status."""
    from loraplex.entrypoints.cli import CLIError

    try:
        base, adapters = demo_model_paths()
    except FileNotFoundError as e:
        raise CLIError(str(e)) from None
    if getattr(args, "serve", False):
        return _serve(args, base, adapters)
    try:
        return _offline(args, base, adapters)
    except ValueError as e:  # a bad --prompt/--max-tokens, or an unreadable adapter: one line
        raise CLIError(str(e)) from None


def _offline(args: argparse.Namespace, base: Path, adapters: dict[str, Path]) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from loraplex import LLM, LoRARequest, SamplingParams

    console = Console()
    prompts = list(getattr(args, "prompts", None) or DEMO_PROMPTS)
    max_tokens = int(getattr(args, "max_tokens", 24))
    with console.status(f"Loading the demo model and {len(adapters)} LoRA adapters "
                        f"({', '.join(adapters)}) ..."):
        t0 = time.perf_counter()
        llm = LLM(model=str(base), enable_lora=True, max_loras=max(1, len(adapters)),
                  max_lora_rank=_max_rank(adapters), device=getattr(args, "device", "auto"),
                  kv_cache_memory_bytes=DEMO_KV_CACHE_BYTES)
        load_s = time.perf_counter() - t0
    console.print(f"Loaded [bold]{escape(str(base))}[/] with adapters {', '.join(adapters)} "
                  f"in {load_s:.1f}s.")

    models: list[tuple[str, LoRARequest | None]] = [("base", None)] + [
        (name, LoRARequest(name, i, str(path))) for i, (name, path) in
        enumerate(adapters.items(), start=1)]
    batch_prompts = [p for _ in models for p in prompts]
    batch_loras = [lora for _, lora in models for _ in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    t0 = time.perf_counter()
    outputs = llm.generate(batch_prompts, params, lora_request=batch_loras, use_tqdm=False)
    gen_s = time.perf_counter() - t0
    n_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)

    table = Table(title="Same prompts, one batch, base + every adapter (greedy)",
                  show_lines=True)
    table.add_column("prompt", style="bold")
    for name, _ in models:
        table.add_column(name)
    results: dict[str, dict[str, Any]] = {name: {} for name, _ in models}
    for j, prompt in enumerate(prompts):
        row = [Text(prompt)]  # Text, not markup: a prompt may contain "[...]"
        for i, (name, _) in enumerate(models):
            out = outputs[i * len(prompts) + j].outputs[0]
            row.append(Text(out.text.strip()))
            results[name][prompt] = {"text": out.text, "token_ids": list(out.token_ids)}
        table.add_row(*row)
    console.print(table)
    for name in adapters:
        console.print(f"  [bold]{name}[/]: {ADAPTER_BLURBS.get(name, 'a LoRA adapter')}")
    console.print(f"{len(outputs)} requests ({len(prompts)} prompt(s) x {len(models)} models) "
                  f"in one mixed batch: {n_tokens} tokens in {gen_s:.2f}s = "
                  f"[bold]{n_tokens / gen_s:.0f} tokens/s[/]")
    console.print("Try the server: [bold]loraplex demo --serve[/]")
    if getattr(args, "json_out", None):
        Path(args.json_out).write_text(json.dumps(
            {"base": str(base), "adapters": {k: str(v) for k, v in adapters.items()},
             "prompts": prompts, "max_tokens": max_tokens, "outputs": results,
             "tokens": n_tokens, "seconds": gen_s, "tokens_per_s": n_tokens / gen_s},
            indent=2) + "\n")
    return 0


def serve_argv(base: Path, adapters: dict[str, Path], host: str, port: int) -> list[str]:
    """The ``loraplex serve`` arguments that serve the demo model with every adapter."""
    argv = ["serve", str(base), "--served-model-name", "loraplex-demo", "--host", host,
            "--port", str(port), "--enable-lora", "--max-loras", str(max(1, len(adapters))),
            "--max-lora-rank", str(_max_rank(adapters)),
            "--kv-cache-memory-bytes", str(DEMO_KV_CACHE_BYTES)]
    if adapters:
        argv += ["--lora-modules", *(f"{name}={path}" for name, path in adapters.items())]
    return argv


def _serve(args: argparse.Namespace, base: Path, adapters: dict[str, Path]) -> int:
    from loraplex.entrypoints import cli

    host, port = getattr(args, "host", "127.0.0.1"), int(getattr(args, "port", 8000))
    argv = serve_argv(base, adapters, host, port)
    url_host = "localhost" if host in ("0.0.0.0", "127.0.0.1", "::") else host
    url = f"http://{url_host}:{port}/v1"
    first = next(iter(adapters), "loraplex-demo")
    body = json.dumps({"model": first, "prompt": DEMO_PROMPTS[0], "max_tokens": 16,
                       "temperature": 0})
    print("Starting: loraplex " + shlex.join(argv))
    print(f"Models: loraplex-demo (the base), {', '.join(adapters)}. Once it says it is "
          "listening, try:\n")
    print(f"  curl {url}/models")
    print(f"  curl {url}/completions -H 'Content-Type: application/json' \\\n"
          f"    -d {shlex.quote(body)}")
    chat = json.dumps({"model": "pirate" if "pirate" in adapters else first,
                       "messages": [{"role": "user", "content": DEMO_PROMPTS[1]}],
                       "max_tokens": 16, "temperature": 0})
    print(f"  curl {url}/chat/completions -H 'Content-Type: application/json' \\\n"
          f"    -d {shlex.quote(chat)}")
    print(f"\n  python -c \"from openai import OpenAI; c = OpenAI(base_url='{url}', "
          f"api_key='none'); print(c.completions.create(model='{first}', "
          f"prompt='{DEMO_PROMPTS[0]}', max_tokens=16, temperature=0).choices[0].text)\"\n",
          flush=True)
    return cli.main(argv)


if __name__ == "__main__":
    _p = argparse.ArgumentParser(prog="loraplex demo")
    add_demo_args(_p)
    sys.exit(main(_p.parse_args()))
