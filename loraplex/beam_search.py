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

from collections.abc import Callable, Sequence
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


class BeamSearch:
    """The search apart from running the model, so that the offline API and the server
    drive the same one: `live()` are the beams to run one token for (none: done),
    `advance()` takes each one's top logprobs, `best()` the result."""

    def __init__(self, prompts: list[list[int]], loras: list[LoRARequest | None],
                 params: BeamSearchParams, eos_token_ids: set[int]) -> None:
        self.params, self.eos_token_ids = params, eos_token_ids
        self.stop_ids = set() if params.ignore_eos else eos_token_ids
        self.instances = [_Instance([BeamSearchSequence(list(ids), [], lora_request=lora)])
                          for ids, lora in zip(prompts, loras, strict=True)]
        self.steps = 0
        # one token per beam, with the 2 x width most likely as candidates
        self.step_params = SamplingParams(max_tokens=1, temperature=params.temperature,
                                          logprobs=2 * params.beam_width, ignore_eos=True,
                                          detokenize=False)

    def score(self, beam: BeamSearchSequence) -> float:
        return beam_search_score(beam.tokens, beam.cum_logprob, self.eos_token_ids,
                                 self.params.length_penalty)

    def live(self) -> list[BeamSearchSequence]:
        if self.steps >= self.params.max_tokens:
            return []
        return [b for inst in self.instances for b in inst.beams]

    def advance(self, tops: list[dict[int, Logprob]]) -> None:
        """Each live beam's candidates (its step's logprobs, in live() order)."""
        candidates = iter(tops)
        for inst in self.instances:
            grown = []
            for beam in inst.beams:
                top = next(candidates)
                for token, lp in top.items():
                    new = BeamSearchSequence(beam.tokens + [token], beam.logprobs + [top],
                                             beam.cum_logprob + lp.logprob,
                                             lora_request=beam.lora_request)
                    if token in self.stop_ids:
                        new.finish_reason = "stop"
                        inst.completed.append(new)
                    else:
                        grown.append(new)
            inst.beams = sorted(grown, key=self.score, reverse=True)[:self.params.beam_width]
        self.steps += 1

    def best(self, decode: Callable[[BeamSearchSequence, list[int]], str]
             ) -> list[BeamSearchOutput]:
        """Per prompt the beam_width best, best first, each with its text: decode(beam,
        its own tokens)."""
        outputs = []
        for inst in self.instances:
            for beam in inst.beams:
                beam.finish_reason = "length"
            best = sorted(inst.completed + inst.beams, key=self.score,
                          reverse=True)[:self.params.beam_width]
            for beam in best:
                beam.text = decode(beam, beam.tokens[len(beam.tokens) - len(beam.logprobs):])
            outputs.append(BeamSearchOutput(best))
        return outputs


def beam_search(llm: LLM, prompts: Sequence[Any], params: BeamSearchParams,
                loras: list[LoRARequest | None], use_tqdm: bool = False
                ) -> list[BeamSearchOutput]:
    """LLM.beam_search: the search driven by LLM.generate (`loras`: one per prompt)."""
    engine = llm.llm_engine
    llm._register(loras)  # an adapter that adds tokens encodes with its own tokenizer
    ids = [engine._tokenize(p, engine.get_tokenizer(lora))[1]
           for p, lora in zip(prompts, loras, strict=True)]
    search = BeamSearch(ids, loras, params, engine.eos_token_ids)
    while beams := search.live():
        outs = llm.generate([{"prompt_token_ids": b.tokens} for b in beams],
                            search.step_params, [b.lora_request for b in beams],
                            use_tqdm=use_tqdm)
        search.advance([o.outputs[0].logprobs[0] for o in outs])
    return search.best(lambda beam, own: engine.get_tokenizer(beam.lora_request).decode(
        own, skip_special_tokens=True))
