"""Session-wide tiny models, adapters and prompts shared by every correctness test."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from tests.fixtures import (
    ARCHS,
    SAMPLE_SENTENCES,
    load_tokenizer,
    make_peft_adapter,
    make_tiny_model,
)

# Under pytest-xdist (the README's `-n 2`) the workers share the cores: each, and each
# server it starts (tests/server_utils.py copies this env), runs torch on one thread, so no
# two OpenMP teams spin against each other. tests/test_cpu_threads.py gives itself two.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# Progress bars from every tiny load/save would drown test output.
hf_logging.disable_progress_bar()

# name -> make_peft_adapter kwargs; each adapter gets its own seed so they differ.
ADAPTER_SPECS: dict[str, dict[str, Any]] = {
    "r4_qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=11),
    "r8_all": dict(r=8, lora_alpha=16, target_modules="all-linear", seed=12),
    "r16_rslora": dict(
        r=16,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        use_rslora=True,
        seed=13,
    ),
    "r8_patterns": dict(
        r=8,
        lora_alpha=16,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        rank_pattern={"o_proj": 4},
        alpha_pattern={"v_proj": 32},
        seed=14,
    ),
    "r8_regex": dict(r=8, lora_alpha=16, target_modules=r".*\.(q_proj|down_proj)$", seed=15),
}


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One session directory holding every generated checkpoint."""
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    """The shared byte-level BPE tokenizer (same vocab as every tiny model)."""
    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_models(tiny_root: Path) -> dict[str, Path]:
    """arch -> model dir for llama/mistral/qwen2/qwen3 (fp32 safetensors, distinct seeds)."""
    return {
        arch: make_tiny_model(tiny_root / "models" / arch, arch, seed=i)
        for i, arch in enumerate(ARCHS)
    }


@pytest.fixture(scope="session")
def tiny_adapters(tiny_root: Path, tiny_models: dict[str, Path]) -> dict[str, dict[str, Path]]:
    """arch -> {adapter name -> PEFT adapter dir}; names are the keys of ADAPTER_SPECS."""
    out: dict[str, dict[str, Path]] = {}
    for arch, base in tiny_models.items():
        out[arch] = {
            name: make_peft_adapter(base, tiny_root / "adapters" / arch / name, **spec)
            for name, spec in ADAPTER_SPECS.items()
        }
    return out


@pytest.fixture(scope="session")
def prompts(tokenizer: PreTrainedTokenizerFast) -> list[list[int]]:
    """Token-id prompts (BOS included) of increasing length, 3..~40 tokens."""
    out = [tokenizer.encode(s) for s in SAMPLE_SENTENCES]
    assert all(3 <= len(p) <= 40 for p in out), [len(p) for p in out]
    return out


@pytest.fixture
def cuda_current_devices(monkeypatch: pytest.MonkeyPatch) -> dict[int, int]:
    """torch.cuda's per-thread current device, stubbed for a machine without a GPU:
    thread id -> the device it set (torch.cuda.set_device); a thread reads 0 until then."""
    current: dict[int, int] = {}
    monkeypatch.setattr(torch.cuda, "current_device",
                        lambda: current.get(threading.get_ident(), 0))
    monkeypatch.setattr(torch.cuda, "set_device",
                        lambda device: current.__setitem__(threading.get_ident(), device))
    return current
