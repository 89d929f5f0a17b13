"""POST /tokenize and /detokenize (vLLM's): the server's tokenizer and chat template, so a
client can count tokens or check a rendered conversation without a completion."""

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


class OpenAIServingTokenization:
    def __init__(self, chat: OpenAIServingChat) -> None:
        self.chat = chat  # its encoder thread and chat template rendering
        self.models = chat.models

    def _encode(self, req: TokenizeRequest) -> list[int]:
        if (req.prompt is None) == (req.messages is None):
            raise BadRequestError("give exactly one of prompt and messages", param="prompt")
        if req.prompt is not None:
            add = True if req.add_special_tokens is None else req.add_special_tokens
            return list(self.chat.encoder(req.prompt, add_special_tokens=add).input_ids)
        chat = ChatCompletionRequest(
            messages=req.messages, add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            add_special_tokens=bool(req.add_special_tokens), chat_template=req.chat_template,
            chat_template_kwargs=req.chat_template_kwargs)
        return self.chat.render(chat)[1]

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        self.models.require_served(req.model)  # the base's tokenizer serves all
        ids = await self.chat.off_loop(self._encode, req)
        strs = self.chat.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.chat.max_model_len,
                                tokens=ids, token_strs=strs)

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self.models.require_served(req.model)  # the base's tokenizer serves all
        vocab = len(self.chat.tokenizer)
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise BadRequestError(f"token id {bad[0]} is out of range [0, {vocab})",
                                  param="tokens")
        return DetokenizeResponse(prompt=self.chat.tokenizer.decode(req.tokens))
