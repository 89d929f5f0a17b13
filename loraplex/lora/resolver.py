"""LoRA resolvers: turn an unknown model name into an adapter to load (vLLM's plugin API).

A resolver is asked only when a request names a model the server does not know and
runtime LoRA updating is enabled; registered resolvers are asked in registration order.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Set
from dataclasses import dataclass, field

from loraplex.lora.request import LoRARequest

logger = logging.getLogger(__name__)


class LoRAResolver(ABC):
    @abstractmethod
    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        """Return a LoRARequest whose ``lora_path`` is a local adapter dir, or None.

        The server assigns its own ``lora_int_id``; the one returned here is ignored.
        """


@dataclass
class _LoRAResolverRegistry:
    resolvers: dict[str, LoRAResolver] = field(default_factory=dict)

    def get_supported_resolvers(self) -> Set[str]:
        return self.resolvers.keys()

    def register_resolver(self, resolver_name: str, resolver: LoRAResolver) -> None:
        if not isinstance(resolver, LoRAResolver):
            raise TypeError(f"resolver {resolver_name!r} must subclass LoRAResolver, "
                            f"got {type(resolver).__name__}")
        if resolver_name in self.resolvers:
            logger.warning("LoRA resolver %r is already registered; replacing it",
                           resolver_name)
        self.resolvers[resolver_name] = resolver

    def get_resolver(self, resolver_name: str) -> LoRAResolver:
        if resolver_name not in self.resolvers:
            raise KeyError(f"LoRA resolver {resolver_name!r} is not registered (registered: "
                           f"{', '.join(self.resolvers) or 'none'})")
        return self.resolvers[resolver_name]


LoRAResolverRegistry = _LoRAResolverRegistry()
