"""Train loraplex's built-in demo model: a tiny Llama sentence-completer and three LoRA adapters.

Nothing is downloaded: the training text comes from a small template grammar of simple English
sentences ("the cat sat on the mat."), generated here with fixed seeds. The script

1. trains a tiny byte-level BPE tokenizer on that text (every grammar word is one token),
2. trains a ``transformers.LlamaForCausalLM`` from scratch to complete such sentences,
3. trains three real PEFT LoRA adapters on the frozen base, each on prompt -> continuation pairs:

   - ``caps``:    continues the sentence in ALL CAPS        ("the cat sat on" -> " THE MAT.")
   - ``pirate``:  continues it in pirate speak               ("the cat sat on" -> " th' deck, arr!")
   - ``reverse``: says the prompt's words back in reverse    ("the cat sat on" -> " on sat cat the")

and writes everything (safetensors, tokenizer, PEFT adapter dirs) to ``loraplex/demo_model/``,
then prints greedy samples from transformers + PEFT as a check. The three behaviours were chosen
so that a person sees them at a glance on the same prompt, and a test can assert them.

Run: ``python scripts/train_demo.py`` (about 6 minutes on 2 CPU cores: base 75 s, caps 30 s,
pirate 35 s, reverse 225 s). Seeds are fixed and ``torch.set_num_threads(2)``: a rerun on the same
machine rewrites byte-identical files. Sizes: base 0.89M parameters (3.5 MB fp32 safetensors);
adapters on q/k/v/o/gate/up/down, caps and pirate r=8 (0.3 MB each), reverse r=16 (0.6 MB);
4.8 MB in all. ``--skip-base --only NAME`` retrains one adapter on the shipped base.

Limits, by design of the tiny budget: the base knows only the grammar's words (others are
spelled out byte by byte and continue poorly), and ``reverse`` reverses sentences like the
grammar's (19 of 20 held-out ones), not arbitrary word lists.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "loraplex" / "demo_model"
BASE_NAME = "loraplex-demo"  # what adapter_config.json names as its base (no local path)
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3
# The demo model completes text, so chat renders the messages' contents as the text to continue.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if not loop.first %} {% endif %}"
    "{{ m['content'] }}{% endfor %}"
)
DEMO_PROMPTS = ("the cat sat on", "my friend walked to", "the old man likes to",
                "a little bird can see")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# ---------------------------------------------------------------------------------------------
# The grammar. Weights make one continuation the clear favourite (greedy picks "the mat").
# ---------------------------------------------------------------------------------------------
Choice = Sequence[tuple[str, float]]
SUBJECTS: Choice = [
    ("the cat", 3), ("the dog", 3), ("my friend", 2), ("the old man", 2), ("a little bird", 2),
    ("the girl", 2), ("the boy", 2), ("my mother", 1), ("the teacher", 1), ("the farmer", 1),
    ("a small fox", 1), ("the king", 1),
]
PREDICATES: dict[str, list[Choice]] = {
    "sat on the": [[("mat", 6), ("chair", 2), ("floor", 2), ("bed", 1), ("box", 1)],
                   [("", 6), ("in the sun", 2), ("by the door", 2), ("all day", 1)]],
    "walked to the": [[("park", 6), ("market", 2), ("river", 2), ("school", 2), ("shop", 1),
                       ("beach", 1)],
                      [("with a friend", 5), ("in the rain", 2), ("", 2), ("at night", 1)]],
    "likes to": [[("eat fish", 6), ("sing", 2), ("read books", 2), ("play games", 2),
                  ("sleep all day", 1), ("run fast", 1)],
                 [("", 1)]],
    "can see the": [[("moon", 6), ("sun", 2), ("sea", 2), ("trees", 2), ("stars", 2),
                     ("hills", 1)],
                    [("from the window", 5), ("", 3), ("at night", 1)]],
    "is very": [[("happy", 6), ("tired", 2), ("hungry", 2), ("kind", 2), ("small", 1)],
                [("today", 4), ("", 4)]],
    "ate a": [[("big cake", 6), ("red apple", 2), ("fish", 2), ("pie", 2), ("pear", 1)],
              [("for lunch", 4), ("", 3)]],
    "has a": [[("red hat", 6), ("blue ball", 2), ("green box", 2), ("big house", 2),
               ("long tail", 1)],
              [("", 1)]],
}
PREDICATE_WEIGHTS = {"sat on the": 3, "walked to the": 2, "likes to": 2, "can see the": 2,
                     "is very": 2, "ate a": 2, "has a": 2}

PIRATE = {
    "the": "th'", "my": "me", "a": "a", "to": "t'", "friend": "matey", "man": "sea dog",
    "boy": "lad", "girl": "lass", "mat": "deck", "floor": "deck", "chair": "barrel",
    "bed": "hammock", "box": "chest", "park": "island", "market": "port", "river": "sea",
    "school": "ship", "shop": "tavern", "beach": "shore", "walked": "sailed", "is": "be",
    "very": "mighty", "happy": "jolly", "fish": "grog", "sing": "sing shanties",
    "read": "read", "books": "maps", "games": "dice", "with": "wi'", "sun": "sun",
    "moon": "moon", "cake": "biscuit", "apple": "biscuit", "pie": "biscuit", "pear": "biscuit",
    "house": "ship", "hat": "hat", "day": "day", "rain": "storm", "window": "crow's nest",
    "trees": "palm trees", "stars": "stars", "for": "fer", "lunch": "supper",
}


def _pick(rng: random.Random, options: Choice) -> str:
    return rng.choices([o for o, _ in options], weights=[w for _, w in options])[0]


def make_sentence(rng: random.Random) -> list[str]:
    """One grammar sentence as a list of words (no final period)."""
    pred = rng.choices(list(PREDICATE_WEIGHTS), weights=list(PREDICATE_WEIGHTS.values()))[0]
    parts = [_pick(rng, SUBJECTS), pred] + [_pick(rng, slot) for slot in PREDICATES[pred]]
    return " ".join(p for p in parts if p).split()


def vocabulary() -> list[str]:
    """Every word the grammar can produce (for reverse prompts and the tokenizer check)."""
    words: set[str] = set()
    for options in [SUBJECTS] + [s for slots in PREDICATES.values() for s in slots]:
        for phrase, _ in options:
            words.update(phrase.split())
    for pred in PREDICATES:
        words.update(pred.split())
    return sorted(words)


# The transforms: continuation words -> the adapter's continuation text (with leading space).
def plain(words: list[str]) -> str:
    return " " + " ".join(words) + "."


def caps(words: list[str]) -> str:
    return plain(words).upper()


def pirate(words: list[str]) -> str:
    return " " + " ".join(PIRATE.get(w, w) for w in words) + ", arr!"


def reverse_prompt(prompt_words: list[str]) -> str:
    return " " + " ".join(reversed(prompt_words))


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
def build_tokenizer(rng: random.Random) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes, no <unk>) whose merges cover every demo word."""
    lines = []
    for _ in range(4000):
        words = make_sentence(rng)
        lines += [" ".join(words) + ".", caps(words), pirate(words), reverse_prompt(words)]
    lines.append(" ".join(vocabulary()) + " " + " ".join(PIRATE.values()))
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", clean_up_tokenization_spaces=False, model_max_length=128)
    fast.chat_template = CHAT_TEMPLATE
    return fast


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
Example = tuple[list[int], int]  # token ids (bos ... eos), index where the loss starts


def encode(tok: PreTrainedTokenizerFast, prompt: str, target: str) -> Example:
    """BOS + prompt + target + EOS; the loss covers target + EOS only (or all if no prompt)."""
    p = tok(prompt).input_ids if prompt else [tok.bos_token_id]
    t = tok(target, add_special_tokens=False).input_ids
    return p + t + [tok.eos_token_id], len(p)


def batches(examples: list[Example], batch_size: int, pad_id: int, steps: int,
            rng: random.Random):
    for _ in range(steps):
        batch = rng.sample(examples, batch_size)
        n = max(len(ids) for ids, _ in batch)
        ids = torch.full((batch_size, n), pad_id)
        labels = torch.full((batch_size, n), -100)
        mask = torch.zeros((batch_size, n), dtype=torch.long)
        for i, (seq, start) in enumerate(batch):
            ids[i, :len(seq)] = torch.tensor(seq)
            mask[i, :len(seq)] = 1
            labels[i, start:len(seq)] = torch.tensor(seq[start:])
        yield ids, mask, labels


def train(model: torch.nn.Module, examples: list[Example], steps: int, lr: float,
          pad_id: int, seed: int, label: str, batch_size: int = 64) -> None:
    """AdamW with warmup + cosine decay; prints the loss every so often."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    t0 = time.time()
    for step, (ids, mask, labels) in enumerate(
            batches(examples, batch_size, pad_id, steps, random.Random(seed))):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  [{label}] step {step:4d}/{steps}  loss {loss.item():.3f}  "
                  f"{time.time() - t0:.0f}s", flush=True)
    model.eval()


def adapter_examples(tok: PreTrainedTokenizerFast, rng: random.Random, n: int,
                     transform: Callable[[list[str]], str]) -> list[Example]:
    """Prompt = a prefix of a grammar sentence; target = the transformed rest."""
    out = []
    for _ in range(n):
        words = make_sentence(rng)
        k = rng.randint(1, len(words) - 1)
        out.append(encode(tok, " ".join(words[:k]), transform(words[k:])))
    return out


def reverse_examples(tok: PreTrainedTokenizerFast, rng: random.Random, n: int) -> list[Example]:
    """Half grammar prefixes, half random word lists (a push to reverse rather than recall).

    The tiny base has no copying circuitry, so in this budget the adapter learns to reverse
    grammar sentences (prompts like the demo's), not arbitrary word lists. Rank 16 and 3000
    steps take held-out grammar prefixes from 17/20 (r=8, 1000 steps) to 19/20; a learning
    rate of 1e-2 diverged.
    """
    vocab = vocabulary()
    out = []
    for i in range(n):
        if i % 2:
            words = make_sentence(rng)
            words = words[:rng.randint(2, len(words))]
        else:
            words = rng.sample(vocab, rng.randint(2, 7))
        out.append(encode(tok, " ".join(words), reverse_prompt(words)))
    return out


def save_tokenizer(tok: PreTrainedTokenizerFast, path: Path) -> None:
    """Save, then name the class and chat template the way transformers 4.x reads them too."""
    tok.save_pretrained(path)
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # v5 writes "TokenizersBackend"
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def greedy(model: torch.nn.Module, tok: PreTrainedTokenizerFast, prompt: str,
           max_new_tokens: int = 24) -> str:
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--base-steps", type=int, default=1200)
    ap.add_argument("--adapter-steps", type=int, default=500)
    ap.add_argument("--reverse-steps", type=int, default=3000)
    ap.add_argument("--adapter-lr", type=float, default=5e-3)
    ap.add_argument("--reverse-rank", type=int, default=16)
    ap.add_argument("--reverse-lr", type=float, default=3e-3)
    ap.add_argument("--skip-base", action="store_true",
                    help="Keep the base already in --out; train only the adapters.")
    ap.add_argument("--only", nargs="*", default=None, help="Train only these adapters.")
    args = ap.parse_args()

    torch.set_num_threads(2)
    torch.manual_seed(0)
    hf_logging.disable_progress_bar()  # a bar per tiny load would bury the losses
    t_start = time.time()
    tok = build_tokenizer(random.Random(1))
    words = [w for phrase in vocabulary() + list(PIRATE.values()) for w in phrase.split()]
    split = [w for w in words + [w.upper() for w in words]
             if len(tok(" " + w, add_special_tokens=False).input_ids) > 1]
    print(f"tokenizer: {len(tok)} tokens; words split into pieces: {sorted(set(split))}")

    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    base = LlamaForCausalLM(config)
    print(f"base: {sum(p.numel() for p in base.parameters()) / 1e6:.2f}M parameters")
    rng = random.Random(2)
    # Mostly plain sentences, some whole sentences in caps or pirate speak: the base learns the
    # whole vocabulary (LoRA cannot train embeddings), but a plain prompt continues plainly.
    styles = rng.choices([plain, caps, pirate], weights=[70, 15, 15], k=20000)
    base_data = [encode(tok, "", style(make_sentence(rng))[1:]) for style in styles]
    base_dir = args.out / "base"
    if args.skip_base:  # iterate on the adapters alone, on the base already in --out
        print(f"using the base in {base_dir}")
    else:
        train(base, base_data, args.base_steps, 3e-3, tok.pad_token_id, seed=3, label="base")
        if args.out.exists():
            shutil.rmtree(args.out)
        base.save_pretrained(base_dir, safe_serialization=True)
        save_tokenizer(tok, base_dir)

    # name -> (make examples, steps, rank, learning rate)
    specs = {
        "caps": (lambda r: adapter_examples(tok, r, 20000, caps), args.adapter_steps, 8,
                 args.adapter_lr),
        "pirate": (lambda r: adapter_examples(tok, r, 20000, pirate), args.adapter_steps, 8,
                   args.adapter_lr),
        "reverse": (lambda r: reverse_examples(tok, r, 20000),
                    args.reverse_steps, args.reverse_rank, args.reverse_lr),
    }
    for seed, (name, (make, steps, rank, lr)) in enumerate(specs.items(), start=10):
        if args.only is not None and name not in args.only:
            continue
        torch.manual_seed(seed)
        model = LlamaForCausalLM.from_pretrained(base_dir)
        lcfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS,
                          task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, lcfg)
        train(peft_model, make(random.Random(seed)), steps, lr, tok.pad_token_id,
              seed=seed + 100, label=name)
        adir = args.out / "adapters" / name
        peft_model.save_pretrained(adir, safe_serialization=True)
        (adir / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
        cfg_path = adir / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = BASE_NAME
        cfg["target_modules"] = sorted(cfg["target_modules"])  # PEFT writes a set's order
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    print(f"trained in {time.time() - t_start:.0f}s; greedy samples (transformers + PEFT):")
    base = LlamaForCausalLM.from_pretrained(base_dir).eval()
    for prompt in DEMO_PROMPTS:
        print(f"  {prompt!r}")
        print(f"    base    -> {greedy(base, tok, prompt)!r}")
        for name in specs:
            if not (args.out / "adapters" / name).exists():
                continue
            m = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir),
                                          args.out / "adapters" / name).eval()
            print(f"    {name:<7} -> {greedy(m, tok, prompt)!r}")
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"wrote {args.out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
