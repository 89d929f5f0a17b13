"""The engine's adapter administration (vLLM's add_lora / remove_lora / pin_lora /
list_loras, and loraplex's register_lora, prepare_lora): calls on lora/manager.py's
LoRAManager, plus what only the engine knows, its requests: an adapter still running
requests is removed once they finish (`_pending_lora_removal`), and an adapter that
failed to load fails its requests. What an adapter changes for its requests: their
tokenizer and vocabulary (an adapter that adds tokens).

A mixin of LLMEngine (engine/llm_engine.py); it reads the engine's attributes named below.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import Any

from loraplex.config import LoRAConfig
from loraplex.engine.request import Request
from loraplex.engine.scheduler import Scheduler
from loraplex.engine.sequence import Sequence
from loraplex.lora.adapter import PackedLoRA, local_adapter_dir
from loraplex.lora.errors import LoRAError
from loraplex.lora.manager import LoRAManager
from loraplex.lora.request import LoRARequest

logger = logging.getLogger(__name__)


class LoRAAdmin:
    """LLMEngine's adapter calls and their bookkeeping against its requests."""

    lora_manager: LoRAManager | None
    lora_config: LoRAConfig | None
    requests: dict[str, Request]
    scheduler: Scheduler
    tokenizer: Any
    model: Any
    _pending_lora_removal: set[int]

    def _require_lora(self) -> LoRAManager:
        if self.lora_manager is None:
            raise ValueError("LoRA is not enabled: create the engine with enable_lora=True")
        return self.lora_manager

    def prepare_lora(self, lora_request: LoRARequest) -> PackedLoRA:
        """Read and validate an adapter (I/O only); safe to call from any thread."""
        return self._require_lora().prepare(lora_request)

    def prepare_lora_in_background(self, lora_request: LoRARequest) -> Future[PackedLoRA]:
        """prepare_lora on an adapter-loader thread, whose torch ops run single-threaded
        (worker/cpu_threads.py); the future raises what prepare_lora would."""
        return self._require_lora().loader.run(self.prepare_lora, lora_request)

    def register_lora(self, lora_request: LoRARequest, fetch_hub: bool = False) -> bool:
        """Make an adapter known without reading its weights (its config is checked);
        they are read off the step loop when a request first needs them. Cheap enough
        for thousands. False if this exact adapter is registered already.
        `fetch_hub`: a hub id not registered yet is fetched and read now, as add_lora
        does (the offline API, which waits anyway: only then is it known whether the
        adapter adds tokens, which its prompts must be encoded with)."""
        manager = self._require_lora()
        if fetch_hub and lora_request.lora_int_id not in manager.registered \
                and local_adapter_dir(lora_request) is None:
            return self.add_lora(lora_request)
        added = manager.register(lora_request)  # raises for another adapter on this id
        self._pending_lora_removal.discard(lora_request.lora_int_id)  # wanted again
        return added

    def add_lora(self, lora_request: LoRARequest, prepared: PackedLoRA | None = None) -> bool:
        """Register and load now, validating the weights too (vLLM's add_lora)."""
        manager = self._require_lora()
        added = manager.add(lora_request, prepared)  # raises for another adapter on this id
        self._pending_lora_removal.discard(lora_request.lora_int_id)  # wanted again
        return added

    def remove_lora(self, lora_int_id: int) -> bool:
        """Unregister; requests already running on it finish on its weights first."""
        manager = self._require_lora()
        if lora_int_id not in manager.registered:
            return False
        if any(s.lora_int_id == lora_int_id for r in self.requests.values() for s in r.seqs
               if not s.is_finished):
            self._pending_lora_removal.add(lora_int_id)
            return True
        return manager.remove(lora_int_id)

    def _collect_lora_removals(self) -> None:
        if not self._pending_lora_removal:
            return
        busy = {s.lora_int_id for r in self.requests.values() for s in r.seqs
                if not s.is_finished}
        for lora_id in list(self._pending_lora_removal - busy):
            self._pending_lora_removal.discard(lora_id)
            self.lora_manager.remove(lora_id)

    def list_loras(self) -> set[int]:
        if self.lora_manager is None:
            return set()
        return set(self.lora_manager.registered) - self._pending_lora_removal

    def list_registered_loras(self) -> set[int]:
        """list_loras and the adapters whose removal waits for their requests: the ids
        whose files the engine may still read."""
        return set(self.lora_manager.registered) if self.lora_manager is not None else set()

    def has_lora(self, lora_int_id: int) -> bool:
        """``lora_int_id in list_loras()`` without building the set of every registered
        id (thousands of them) for each request."""
        return (self.lora_manager is not None and lora_int_id in self.lora_manager.registered
                and lora_int_id not in self._pending_lora_removal)

    def pin_lora(self, lora_int_id: int) -> bool:
        return self._require_lora().pin(lora_int_id)

    def _use_lora(self, req: LoRARequest) -> int:
        if self.lora_manager is None:
            raise ValueError(f"request asks for LoRA adapter {req.lora_name!r} but LoRA is "
                             "not enabled: create the engine with enable_lora=True")
        self.register_lora(req)  # config only: the weights load off the step loop
        if req.lora_int_id not in self.lora_manager.pinned and \
                len(self.lora_manager.pinned) >= self.lora_config.max_loras:
            raise LoRAError(f"adapter {req.lora_name!r} cannot run: all max_loras="
                            f"{self.lora_config.max_loras} slots are pinned by other adapters")
        return req.lora_int_id


    def _fail_lora_requests(self, seqs: list[Sequence], failed: dict[int, LoRAError],
                            touched: dict[str, Request]) -> list[Sequence]:
        for seq in [s for s in self.scheduler.running + list(self.scheduler.waiting)
                    if s.lora_int_id in failed]:
            req = self.requests[seq.request_id]
            req.error = str(failed[seq.lora_int_id])
            seq.finish_reason = "error"
            self.scheduler.finish(seq)
            touched[req.request_id] = req
        logger.error("adapter(s) failed to load: %s", "; ".join(map(str, failed.values())))
        return [s for s in seqs if s.lora_int_id not in failed]

    def get_tokenizer(self, lora_request: LoRARequest | None = None):
        """The tokenizer of requests for `lora_request`: the adapter's own when it adds
        tokens to the vocabulary (registered), else the base model's."""
        if lora_request is None or self.lora_manager is None:
            return self.tokenizer
        return self.lora_manager.tokenizers.get(lora_request.lora_int_id, self.tokenizer)

    def vocab_size(self, lora_request: LoRARequest | None = None) -> int:
        """Token ids a request may use: the base's vocabulary, plus the tokens its adapter
        adds."""
        added = (self.lora_manager.added_token_counts.get(lora_request.lora_int_id, 0)
                 if lora_request is not None and self.lora_manager is not None else 0)
        return self.model.args.vocab_size + added
