"""Embeddings with a LoRA adapter per prompt: one LLM.embed call, one mixed batch.

Runs offline on the demo model the package ships (a tiny Llama and three adapters) as an
embedding model (runner="pooling": last-token pooling, normalized), then prints how close
each adapter's embedding of a sentence is to the base's. Pass --model/--adapter to use
your own checkpoint (a decoder LLM or a `*Model` embedding checkpoint) and adapters.

    python examples/embeddings_offline.py
    python examples/embeddings_offline.py --model Alibaba-NLP/gte-Qwen2-1.5B-instruct \\
        --adapter legal=/path/to/legal-embed
"""

from __future__ import annotations

import argparse

from loraplex import LLM, LoRARequest
from loraplex.entrypoints.demo import demo_model_paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH")
    args = parser.parse_args()
    if args.model is None:
        base, paths = demo_model_paths()
        model, adapters = str(base), {name: str(p) for name, p in paths.items()}
    else:
        model = args.model
        adapters = dict(item.split("=", 1) for item in args.adapter)
    llm = LLM(model, runner="pooling", enable_lora=bool(adapters),
              max_loras=max(1, len(adapters)), max_lora_rank=64)
    sentence = "The quick brown fox jumps over the lazy dog."
    loras = [None] + [LoRARequest(name, i + 1, path)
                      for i, (name, path) in enumerate(adapters.items())]
    outs = llm.embed([sentence] * len(loras), lora_request=loras, use_tqdm=False)
    base_vec = outs[0].outputs.embedding
    print(f"{len(base_vec)}-dimensional embeddings of {sentence!r}")
    for lora, out in zip(loras, outs):
        cosine = sum(a * b for a, b in zip(base_vec, out.outputs.embedding))  # unit vectors
        print(f"  {lora.lora_name if lora else 'base':>10}: cosine to the base {cosine:.4f}")


if __name__ == "__main__":
    main()
