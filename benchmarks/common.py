"""Shared benchmark helpers: random HF checkpoints and PEFT adapters of given shapes,
written to disk as real HF/PEFT directories (no download), and JSON output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def make_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """A word-level tokenizer with `vocab_size` entries: benchmarks feed token ids directly."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(out_dir)


def make_random_llama(out_dir: Path, *, hidden: int, layers: int, heads: int, kv_heads: int,
                      intermediate: int, vocab: int, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out_dir / "config.json").exists():
        return out_dir
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=intermediate,
                      vocab_size=vocab, max_position_embeddings=2048, bos_token_id=1,
                      eos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(out_dir)
    make_tokenizer(out_dir, vocab)
    return out_dir


def make_random_adapter(base_dir: Path, out_dir: Path, *, r: int, targets: list[str],
                        seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if (out_dir / "adapter_config.json").exists():
        return out_dir
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r,
                                                  target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    peft_model.save_pretrained(out_dir)
    return out_dir


def add_shape_args(ap: argparse.ArgumentParser, adapters: int) -> None:
    """The CPU benchmarks' small Llama and its random PEFT adapters (build_shape)."""
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=12)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--adapters", type=int, default=adapters)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lp-bench")


def build_shape(a: argparse.Namespace) -> tuple[Path, list[Path]]:
    """The model and adapter directories of add_shape_args' options (written once, reused)."""
    tag = f"h{a.hidden}_l{a.layers}_v{a.vocab}"
    base = make_random_llama(a.workdir / tag, hidden=a.hidden, layers=a.layers, heads=a.heads,
                             kv_heads=a.kv_heads, intermediate=a.intermediate, vocab=a.vocab)
    adapters = [make_random_adapter(base, a.workdir / f"{tag}_r{a.rank}_{i}", r=a.rank,
                                    targets=a.targets.split(","), seed=i)
                for i in range(a.adapters)]
    return base, adapters


def hf_peft_model(base: Path, adapters: list[Path] | None):
    """HF transformers' model of `base` in fp32, eval; with `adapters`, a PeftModel
    holding each as "a0", "a1", ... (a batch picks them with adapter_names)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if not adapters:
        return model
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    for i, p in enumerate(adapters[1:], start=1):
        model.load_adapter(p, adapter_name=f"a{i}")
    return model


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    print(f"wrote {path}")
