"""Which model names the server answers to: the base, the adapters, and how they change.

Every adapter name maps to one LoRARequest. Runtime loads validate the adapter fully
(on a worker thread) before the name is listed. An in-place reload gives the new
weights a new lora_int_id and points the name at it: requests in flight keep the old
id (and weights) until they finish, then the engine drops the old id.

Changes to one name (load, reload, unload, a resolver's load) take that name's lock and
run to the end even if the client that asked goes away, so the names listed here and
the adapters the engine holds never disagree. A request that looked a name up just
before it changed is queued with ``load_lora=False`` and looks it up again (see
OpenAIServing.start_requests): a stale id is never loaded back into the engine.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from loraplex import envs
from loraplex.engine.async_engine import AsyncLLMEngine
from loraplex.entrypoints.errors import BadRequestError, NotFoundError
from loraplex.entrypoints.protocol import ModelCard, ModelList
from loraplex.lora.adapter import resolve_adapter_path
from loraplex.lora.errors import LoRAError
from loraplex.lora.merge import MergeSpec, merge_adapter_dirs
from loraplex.lora.request import LoRARequest
from loraplex.lora.resolver import LoRAResolverRegistry

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class LoRAModulePath:
    """One --lora-modules item."""

    name: str
    path: str
    base_model_name: str | None = None


NAMES_IN_NOT_FOUND = 20  # served names a 404 for an unknown model lists


@dataclass
class AdapterTokenizers:
    """Copies of an adapter's own tokenizer (one that adds tokens) for the server's
    threads, as the base's (OpenAIServing): `decoder` on the event loop, `encoder` on the
    encoder thread; an HF fast tokenizer must not be used by two threads at once."""

    decoder: Any
    encoder: Any


class OpenAIServingModels:
    def __init__(self, engine: AsyncLLMEngine, served_model_names: list[str],
                 max_model_len: int, lora_enabled: bool) -> None:
        self.engine = engine
        self.served_model_names = served_model_names
        self.max_model_len = max_model_len
        self.lora_enabled = lora_enabled
        self.lora_requests: dict[str, LoRARequest] = {}
        self.tokenizers: dict[int, AdapterTokenizers] = {}  # by lora_int_id
        self._ids = itertools.count(1)
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # name -> (lock, users)
        self._merged_dir: tempfile.TemporaryDirectory | None = None  # merged adapters' dirs
        self._merges: OrderedDict[str, LoRARequest] = OrderedDict()  # by name, LRU first
        self._merges_dropped: dict[int, str] = {}  # lora_int_id -> dir, once unregistered

    @property
    def base_model_name(self) -> str:
        return self.served_model_names[0]

    def is_base_model(self, name: str | None) -> bool:
        return name is None or name in self.served_model_names

    async def _locked(self, name: str, change: Callable[[], Awaitable[T]]) -> T:
        lock, users = self._locks.get(name, (asyncio.Lock(), 0))
        self._locks[name] = (lock, users + 1)
        try:
            async with lock:
                return await change()
        finally:
            lock, users = self._locks[name]
            if users == 1:
                del self._locks[name]  # no lock per name ever asked for stays behind
            else:
                self._locks[name] = (lock, users - 1)

    async def _change(self, name: str, change: Callable[[], Awaitable[T]]) -> T:
        """Run ``change`` under ``name``'s lock, to the end even if our caller is cancelled
        (a client disconnecting must not leave a load or unload half done)."""
        task = asyncio.ensure_future(self._locked(name, change))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # no "never retrieved"
        return await asyncio.shield(task)

    def _new_request(self, name: str, path: str, base_model_name: str | None) -> LoRARequest:
        return LoRARequest(name, next(self._ids), path, base_model_name=base_model_name)

    async def _serve(self, name: str, req: LoRARequest) -> None:
        """`name` answers requests from now on (loaded, reloaded or resolved): an unload's
        pending drop of its metric series is off. An adapter that adds tokens brings its
        own tokenizer: the server takes copies of it (see AdapterTokenizers)."""
        def copies() -> AdapterTokenizers | None:  # on the engine thread, which uses it
            tok = self.engine.engine.get_tokenizer(req)
            if tok is self.engine.engine.tokenizer:
                return None
            return AdapterTokenizers(copy.deepcopy(tok), copy.deepcopy(tok))
        tokenizers = await self.engine.run(copies)
        if tokenizers is not None:
            self.tokenizers[req.lora_int_id] = tokenizers
        self.lora_requests[name] = req
        self.engine.keep_model_metrics(name)

    # ---- listing ------------------------------------------------------------------------
    def show_available_models(self) -> ModelList:
        """Called on a worker thread (the route is a plain def): it reads a copy of the
        adapters (one C call), as the event loop may load or unload some meanwhile."""
        adapters = self.lora_requests.copy().items()
        cards = [ModelCard(id=n, root=self.engine.engine.model_config.model,
                           max_model_len=self.max_model_len)
                 for n in self.served_model_names]
        for name, req in adapters:
            cards.append(ModelCard(id=name, root=req.lora_path,
                                   parent=req.base_model_name or self.base_model_name,
                                   max_model_len=self.max_model_len))
        return ModelList(data=cards)

    # ---- adapters -----------------------------------------------------------------------
    def _require_lora(self) -> None:
        if not self.lora_enabled:
            raise BadRequestError("LoRA is not enabled on this server: start it with "
                                  "--enable-lora")

    async def load_lora_adapter(self, name: str, path: str, load_inplace: bool = False,
                                base_model_name: str | None = None) -> str:
        """Validate and register; the name is listed only once the adapter is ready."""
        self._require_lora()
        if self.is_base_model(name):
            raise BadRequestError(f"{name!r} is the base model's name; pick another "
                                  "lora_name", param="lora_name")

        async def load() -> str:
            old = self.lora_requests.get(name)
            if old is not None and not load_inplace:
                raise BadRequestError(
                    f"The lora adapter '{name}' has already been loaded. If you want to load "
                    "the adapter in place, set 'load_inplace' to True.", param="lora_name")
            req = self._new_request(name, path, base_model_name)
            try:
                await self.engine.add_lora(req)
            except LoRAError as e:
                raise BadRequestError(str(e), param="lora_path") from e
            await self._serve(name, req)
            if old is None:
                logger.info("loaded LoRA adapter %s from %s", name, path)
                return f"Success: LoRA adapter '{name}' added successfully."
            await self.engine.remove_lora(old.lora_int_id)  # deferred while in flight
            self.tokenizers.pop(old.lora_int_id, None)
            logger.info("reloaded LoRA adapter %s in place from %s", name, path)
            return f"Success: LoRA adapter '{name}' reloaded in place successfully."
        return await self._change(name, load)

    async def serve_registered(self, name: str, req: LoRARequest) -> None:
        """Answer to `name` with an adapter the engine registered itself (vLLM serves
        default_mm_loras under their modality's name)."""
        if self.is_base_model(name) or name in self.lora_requests:
            raise BadRequestError(f"{name!r} is served already", param="lora_name")
        await self._change(name, lambda: self._serve(name, req))

    async def unload_lora_adapter(self, name: str) -> str:
        self._require_lora()

        async def unload() -> str:
            req = self.lora_requests.pop(name, None)
            if req is None:
                raise NotFoundError(f"The lora adapter '{name}' cannot be found.",
                                    param="lora_name")
            await self.engine.remove_lora(req.lora_int_id)  # deferred while in flight
            self.tokenizers.pop(req.lora_int_id, None)
            self.engine.forget_model_metrics(name)  # likewise
            logger.info("unloaded LoRA adapter %s", name)
            return f"Success: LoRA adapter '{name}' removed successfully."
        return await self._change(name, unload)

    # ---- per request --------------------------------------------------------------------
    async def resolve(self, name: str | None) -> LoRARequest | None:
        """The adapter a request's ``model`` names (None = base); 404 if unknown.

        With runtime updating on, an unknown name goes to the registered resolvers in
        order; the first hit that loads is served from then on.
        """
        if self.is_base_model(name):
            return None
        assert name is not None
        req = self.lora_requests.get(name)
        if req is not None:
            return req
        resolvers = LoRAResolverRegistry.resolvers
        if not (self.lora_enabled and envs.LORAPLEX_ALLOW_RUNTIME_LORA_UPDATING and resolvers):
            raise self._not_found(name)
        return await self._change(name, lambda: self._resolve_now(name, resolvers))

    async def _resolve_now(self, name: str, resolvers: dict) -> LoRARequest:
        if name in self.lora_requests:  # resolved by a concurrent request
            return self.lora_requests[name]
        failures = []
        for rname, resolver in list(resolvers.items()):
            try:
                hit = await resolver.resolve_lora(self.base_model_name, name)
            except Exception as e:  # a broken plugin is a miss, not a 500
                logger.warning("LoRA resolver %s failed on %r: %s", rname, name, e)
                continue
            if hit is None:
                continue
            req = self._new_request(name, hit.lora_path, hit.base_model_name)
            try:
                await self.engine.add_lora(req)
            except LoRAError as e:
                failures.append(f"{rname}: {e}")
                continue
            await self._serve(name, req)
            logger.info("resolver %s resolved %s to %s", rname, name, hit.lora_path)
            return req
        if failures:
            raise BadRequestError(f"The model `{name}` was found by a LoRA resolver but "
                                  "could not be loaded: " + "; ".join(failures), param="model")
        raise self._not_found(name)

    async def merged(self, spec: MergeSpec, sources: list[LoRARequest]) -> LoRARequest:
        """LoRAX's merged_adapters: the adapter merging `sources` by `spec`, built and
        registered on first use under a name from the merge and its sources' ids (a source
        reloaded in place makes a new merge), then served by that name like any adapter."""
        self._require_lora()
        ids = ",".join(str(r.lora_int_id) for r in sources)
        name = "merged-" + MergeSpec.digest(f"{spec.key}|{ids}")[:16]
        if name in self._merges:
            if self.lora_requests.get(name) is self._merges[name]:
                self._merges.move_to_end(name)
                return self._merges[name]
            del self._merges[name]  # unloaded through /v1/unload_lora_adapter: made again

        async def build() -> LoRARequest:
            if name in self._merges:  # built by a concurrent request
                return self._merges[name]
            await self._drop_old_merges()
            if self._merged_dir is None:
                self._merged_dir = tempfile.TemporaryDirectory(prefix="loraplex-merged-")
            out = os.path.join(self._merged_dir.name, name)

            def write() -> None:
                merge_adapter_dirs(spec, [resolve_adapter_path(r) for r in sources], out)
            try:
                await asyncio.to_thread(write)
                req = self._new_request(name, out, None)
                await self.engine.add_lora(req)
            except LoRAError as e:
                raise BadRequestError(str(e), param="merged_adapters") from e
            await self._serve(name, req)
            self._merges[name] = req
            logger.info("merged adapters %s (%s) registered as %s", ",".join(spec.ids),
                        spec.strategy, name)
            return req
        return await self._change(name, build)

    async def _drop_old_merges(self) -> None:
        """Keep at most LORAPLEX_MAX_MERGED_ADAPTERS - 1 merges before a new one: the
        least recently used are unloaded (requests on them finish first, the engine's
        rule), and their directories deleted once the engine no longer holds them."""
        while self._merges and len(self._merges) >= envs.LORAPLEX_MAX_MERGED_ADAPTERS:
            name, req = self._merges.popitem(last=False)
            if self.lora_requests.get(name) is req:
                del self.lora_requests[name]
            await self.engine.remove_lora(req.lora_int_id)
            self.tokenizers.pop(req.lora_int_id, None)
            self.engine.forget_model_metrics(name)
            self._merges_dropped[req.lora_int_id] = req.lora_path
        registered = await self.engine.run(self.engine.engine.list_registered_loras)
        for lora_id in [i for i in self._merges_dropped if i not in registered]:
            shutil.rmtree(self._merges_dropped.pop(lora_id), ignore_errors=True)

    def require_served(self, name: str | None) -> None:
        """404 unless `name` is the base or a loaded adapter (no resolver is asked)."""
        if not self.is_base_model(name) and name not in self.lora_requests:
            raise self._not_found(name)

    def _not_found(self, name: str) -> NotFoundError:
        """vLLM's message, with the first names that are served (a server with thousands
        of adapters must not answer a typo with all of them)."""
        names = [*self.served_model_names, *self.lora_requests]
        shown = ", ".join(names[:NAMES_IN_NOT_FOUND])
        if len(names) > NAMES_IN_NOT_FOUND:
            shown += f" and {len(names) - NAMES_IN_NOT_FOUND} more (GET /v1/models lists them)"
        return NotFoundError(f"The model `{name}` does not exist. Available models: {shown}",
                             param="model")
