"""Beam search over the engine, as vLLM's `LLM.beam_search` does it.

Each step, every live beam of every prompt runs one token in one batch (a beam is a
prompt: its shared prefix comes from the prefix cache) and returns its 2 x beam_width
most likely next tokens; each prompt keeps the beam_width best extensions by score

    score = cumulative logprob / length ** length_penalty

(length: prompt and output tokens, the final EOS not counted). A beam that draws EOS is
complete; after max_tokens steps the live beams join the complete ones and the
beam_width best are returned, best first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loraplex.lora.request import LoRARequest
from loraplex.outputs import Logprob
from loraplex.sampling_params import BeamSearchParams, SamplingParams

if TYPE_CHECKING:
    from loraplex.entrypoints.llm import LLM


@dataclass
class BeamSearchSequence:
    """One beam: the prompt's and its own tokens, its tokens' logprobs (the top
    2 x beam_width at each step), their sum."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None  # "stop" (EOS) | "length"
    lora_request: LoRARequest | None = None


@dataclass
class BeamSearchOutput:
    """The beam_width best beams of one prompt, best first."""

    sequences: list[BeamSearchSequence]


@dataclass
class _Instance:
    beams: list[BeamSearchSequence]
    completed: list[BeamSearchSequence] = field(default_factory=list)


def beam_search_score(tokens: list[int], cum_logprob: float, eos_token_ids: set[int],
                      length_penalty: float) -> float:
    length = len(tokens) - (1 if tokens and tokens[-1] in eos_token_ids else 0)
    return cum_logprob / (length ** length_penalty)


def beam_search(llm: LLM, prompts: Sequence[Any], params: BeamSearchParams,
                lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
                use_tqdm: bool = False) -> list[BeamSearchOutput]:
    engine = llm.llm_engine
    loras = list(lora_request) if isinstance(lora_request, list | tuple) \
        else [lora_request] * len(prompts)
    if len(loras) != len(prompts):
        raise ValueError(f"lora_request has {len(loras)} entries for {len(prompts)} prompts")
    llm._register(loras)  # an adapter that adds tokens encodes with its own tokenizer
    instances = []
    for prompt, lora in zip(prompts, loras, strict=True):
        _, ids = engine._tokenize(prompt, engine.get_tokenizer(lora))
        instances.append(_Instance([BeamSearchSequence(list(ids), [], lora_request=lora)]))
    eos = set() if params.ignore_eos else engine.eos_token_ids
    width = params.beam_width
    step = SamplingParams(max_tokens=1, temperature=params.temperature, logprobs=2 * width,
                          ignore_eos=True, detokenize=False)

    def score(beam: BeamSearchSequence) -> float:
        return beam_search_score(beam.tokens, beam.cum_logprob, engine.eos_token_ids,
                                 params.length_penalty)

    for _ in range(params.max_tokens):
        beams = [b for inst in instances for b in inst.beams]
        if not beams:
            break
        outs = llm.generate([{"prompt_token_ids": b.tokens} for b in beams], step,
                            [b.lora_request for b in beams], use_tqdm=use_tqdm)
        results = iter(outs)
        for inst in instances:
            grown = []
            for beam in inst.beams:
                top = next(results).outputs[0].logprobs[0]
                for token, lp in top.items():
                    new = BeamSearchSequence(beam.tokens + [token], beam.logprobs + [top],
                                             beam.cum_logprob + lp.logprob,
                                             lora_request=beam.lora_request)
                    if token in eos:
                        new.finish_reason = "stop"
                        inst.completed.append(new)
                    else:
                        grown.append(new)
            inst.beams = sorted(grown, key=score, reverse=True)[:width]
    outputs = []
    for inst in instances:
        for beam in inst.beams:
            beam.finish_reason = "length"
        best = sorted(inst.completed + inst.beams, key=score, reverse=True)[:width]
        for beam in best:
            own = beam.tokens[len(beam.tokens) - len(beam.logprobs):]  # past the prompt
            beam.text = engine.get_tokenizer(beam.lora_request).decode(
                own, skip_special_tokens=True)
        outputs.append(BeamSearchOutput(best))
    return outputs
