"""POST /tokenize and /detokenize (vLLM's): the server's tokenizer and chat template (an
adapter's own when `model` names one that adds tokens), so a client can count tokens or
check a rendered conversation without a completion."""

from __future__ import annotations

from loraplex.entrypoints.errors import BadRequestError
from loraplex.entrypoints.protocol import (
    ChatCompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from loraplex.entrypoints.serving_chat import OpenAIServingChat
from loraplex.lora.request import LoRARequest


class OpenAIServingTokenization:
    def __init__(self, chat: OpenAIServingChat) -> None:
        self.chat = chat  # its encoder thread and chat template rendering
        self.models = chat.models

    def _encode(self, req: TokenizeRequest, lora: LoRARequest | None) -> list[int]:
        if (req.prompt is None) == (req.messages is None):
            raise BadRequestError("give exactly one of prompt and messages", param="prompt")
        if req.prompt is not None:
            add = True if req.add_special_tokens is None else req.add_special_tokens
            encoder = self.chat.encoder_for(lora)
            return list(encoder(req.prompt, add_special_tokens=add).input_ids)
        chat = ChatCompletionRequest(
            messages=req.messages, add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            add_special_tokens=bool(req.add_special_tokens), chat_template=req.chat_template,
            chat_template_kwargs=req.chat_template_kwargs,
            mm_processor_kwargs=req.mm_processor_kwargs)
        return self.chat.render(chat, None, lora)[1]

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        lora = self._adapter(req.model)
        ids = await self.chat.off_loop(self._encode, req, lora)
        strs = (self.chat.decoder_for(lora).convert_ids_to_tokens(ids) if req.return_token_strs
                else None)
        return TokenizeResponse(count=len(ids), max_model_len=self.chat.max_model_len,
                                tokens=ids, token_strs=strs)

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        decoder = self.chat.decoder_for(self._adapter(req.model))
        vocab = len(decoder)
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise BadRequestError(f"token id {bad[0]} is out of range [0, {vocab})",
                                  param="tokens")
        return DetokenizeResponse(prompt=decoder.decode(req.tokens))

    def _adapter(self, model: str | None) -> LoRARequest | None:
        """The served adapter `model` names (None: the base): the base's tokenizer serves
        every adapter but one that adds tokens, which has its own."""
        self.models.require_served(model)
        return None if model is None else self.models.lora_requests.get(model)
