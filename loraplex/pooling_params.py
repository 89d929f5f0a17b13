"""PoolingParams: what a pooling request asks beyond its prompt (vLLM's class)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from loraplex.sampling_params import truncated_prompt

TASKS = (None, "encode", "embed", "classify", "score")


@dataclass
class PoolingParams:
    """`dimensions`: matryoshka truncation of the embedding (then re-normalized), only on
    a model that allows it; `normalize`: None = the model's PoolerConfig;
    `truncate_prompt_tokens`: keep the prompt's last k tokens (-1: max_model_len - 1);
    `task`: the call that made the request (vLLM's; LLM.score / /score set "score", whose
    activation a classifier applies to a cross-encoder's pair; None: the model's own)."""

    dimensions: int | None = None
    normalize: bool | None = None
    truncate_prompt_tokens: int | None = None
    task: str | None = None

    def __post_init__(self) -> None:
        for name in ("dimensions", "truncate_prompt_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be an int, got {value!r}")
        k = self.truncate_prompt_tokens
        if k is not None and not (k >= 1 or k == -1):
            raise ValueError(f"truncate_prompt_tokens must be -1 or an int >= 1, got {k}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")

    def truncate_prompt(self, ids: list[int], max_model_len: int) -> list[int]:
        """The prompt's last truncate_prompt_tokens ids (all of them when None)."""
        return truncated_prompt(ids, self.truncate_prompt_tokens, max_model_len)

    def clone(self) -> PoolingParams:
        return replace(self)
