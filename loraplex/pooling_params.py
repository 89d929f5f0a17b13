"""PoolingParams: what a pooling request asks beyond its prompt (vLLM's class)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PoolingParams:
    """`dimensions`: matryoshka truncation of the embedding (then re-normalized), only on
    a model that allows it; `normalize`: None = the model's PoolerConfig."""

    dimensions: int | None = None
    normalize: bool | None = None

    def __post_init__(self) -> None:
        if self.dimensions is not None and (isinstance(self.dimensions, bool)
                                            or not isinstance(self.dimensions, int)):
            raise ValueError(f"dimensions must be an int, got {self.dimensions!r}")

    def clone(self) -> PoolingParams:
        return PoolingParams(self.dimensions, self.normalize)
