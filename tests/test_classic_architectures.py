"""The older decoder families of models/classic.py against HF transformers + PEFT (fp32),
each a mixed batch of the base and two adapters of different ranks over one slot, prompts
prefilled whole and in chunks:

- GPTBigCode (StarCoder 1): learned positions, multi-query attention fused in c_attn, or
  q/k/v per head without the 1/sqrt(d) scale; adapters on c_attn and on both c_proj (the
  attention's and the MLP's);
- Falcon: 7B's multi-query attention beside the MLP on one LayerNorm, 40B's KV groups
  fused per group with two LayerNorms, and sequential layers with q/k/v per head and
  biases; adapters on query_key_value, dense and the MLP's;
- OPT: learned positions at p + 2, ReLU, biases; adapters on q/k/v/out_proj, fc1, fc2;
- GPT-J: parallel sublayers, rotary on interleaved pairs of part of each head, lm_head
  with a bias; adapters on q/k/v, out_proj, fc_in, fc_out.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

from loraplex.models.registry import build_model
from tests.classic_fixtures import CLASSIC_CONFIGS, has_config, make_classic_model
from tests.engine_utils import check_mixed_batch, make_llm
from tests.fixtures import make_peft_adapter

ARCHS = list(CLASSIC_CONFIGS)
# per family: a low-rank adapter on part of the model, a higher-rank one on every linear
ADAPTERS = {
    "gpt_bigcode": {"r4": ["c_attn", "c_proj"], "r8": "all-linear"},
    "falcon": {"r4": ["query_key_value", "dense"], "r8": "all-linear"},
    "opt": {"r4": ["q_proj", "v_proj", "out_proj", "fc1"], "r8": "all-linear"},
    "gptj": {"r4": ["q_proj", "v_proj", "fc_in"], "r8": "all-linear"},
}


def _adapters(arch: str) -> dict[str, dict]:
    family = next(f for f in ADAPTERS if arch.startswith(f))
    return {name: dict(r=int(name[1:]), lora_alpha=2 * int(name[1:]), target_modules=targets)
            for name, targets in ADAPTERS[family].items()}


@pytest.fixture(scope="module")
def models(tiny_root: Path) -> dict[str, tuple[Path, dict[str, Path]]]:
    class Lazy(dict):
        def __missing__(self, arch: str) -> tuple[Path, dict[str, Path]]:
            if not has_config(arch):
                pytest.skip(f"this transformers ({transformers.__version__}) has no {arch}")
            root = tiny_root / "classic_archs"
            seed = 300 + ARCHS.index(arch)
            base = make_classic_model(root / arch, arch, seed)
            self[arch] = (base, {name: make_peft_adapter(base, root / f"{arch}_{name}",
                                                         seed=seed + i, **spec)
                                 for i, (name, spec) in enumerate(_adapters(arch).items())})
            return self[arch]
    return Lazy()


@pytest.mark.parametrize("budget", [None, 6])
@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_matches_peft(arch, budget, models, prompts):
    base, adapters = models[arch]
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8,
                   **({"enable_chunked_prefill": True, "max_num_batched_tokens": budget}
                      if budget else {}))
    check_mixed_batch(llm, base, adapters, prompts, extra=2)
