"""The OpenAI-compatible HTTP server: FastAPI routes over one AsyncLLMEngine.

    GET  /health /version /metrics /v1/models          GET|POST /ping (SageMaker's health)
    POST /v1/completions /v1/chat/completions /v1/responses   GET /v1/responses/{id}
    POST /v1/messages /v1/messages/count_tokens   (Anthropic's Messages API, its errors
                           in Anthropic's shape: serving_messages.py)
    POST /v1/embeddings /score /rerank   (runner pooling; the generation routes then
                           answer 404, and these do on a generate server)
    POST /classify   (runner pooling, a *ForSequenceClassification checkpoint)
    POST /tokenize /detokenize   POST /invocations (SageMaker's: chat or completions)
    POST /reset_prefix_cache   (LORAPLEX_SERVER_DEV_MODE)
    POST /v1/load_lora_adapter /v1/unload_lora_adapter   (LORAPLEX_ALLOW_RUNTIME_LORA_UPDATING)
    POST /generate /generate_stream /   LoRAX's and TGI's generate API (serving_generate.py)

Every error is OpenAI's body {"error": {message, type, param, code}}; FastAPI's 422s
become 400s with a one-line reason (the generate API's: TGI's {"error", "error_type"},
422 for a bad request, as its clients read them). A request can fail; the server keeps
serving.
"""

# No `from __future__ import annotations`: FastAPI 0.110 resolves the string
# annotations of a route wrapped by with_cancellation in serving_utils' namespace.
import argparse
import asyncio
import copy
import json
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, disable_created_metrics
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplex import envs
from loraplex.engine.arg_utils import EngineArgs
from loraplex.engine.async_engine import AsyncLLMEngine
from loraplex.engine.llm_engine import LLMEngine
from loraplex.entrypoints.anthropic_protocol import CountTokensRequest, MessagesRequest
from loraplex.entrypoints.cli import TOOL_CALL_PARSERS, CLIError
from loraplex.entrypoints.errors import (
    APIError,
    BadRequestError,
    ConflictError,
    NotFoundError,
    error_response,
    shaped_error_response,
)
from loraplex.entrypoints.generate_protocol import ErrorBody, GenerateRequest
from loraplex.entrypoints.http_options import HTTPOptions, add_middleware
from loraplex.entrypoints.protocol import (
    ChatCompletionRequest,
    ClassificationRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    LoadLoRAAdapterRequest,
    RerankRequest,
    ResponsesRequest,
    ScoreRequest,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
    ignored_fields,
)
from loraplex.entrypoints.serving_chat import OpenAIServingChat
from loraplex.entrypoints.serving_classification import OpenAIServingClassification
from loraplex.entrypoints.serving_completion import OpenAIServingCompletion
from loraplex.entrypoints.serving_embedding import OpenAIServingEmbedding
from loraplex.entrypoints.serving_generate import ServingGenerate, error_body, error_status
from loraplex.entrypoints.serving_messages import ServingMessages
from loraplex.entrypoints.serving_models import OpenAIServingModels
from loraplex.entrypoints.serving_responses import OpenAIServingResponses, passed_through
from loraplex.entrypoints.serving_score import OpenAIServingScores
from loraplex.entrypoints.serving_tokenization import OpenAIServingTokenization
from loraplex.entrypoints.serving_transcription import (
    OpenAIServingTranscription,
    read_form,
)
from loraplex.entrypoints.serving_utils import with_cancellation
from loraplex.lora.adapter import local_adapter_dir
from loraplex.lora.errors import LoRAError
from loraplex.lora.request import LoRARequest
from loraplex.metrics import Metrics
from loraplex.plugins import PluginError, load_general_plugins
from loraplex.version import __version__

logger = logging.getLogger(__name__)
T = TypeVar("T", bound=BaseModel)

SERVER_MAX_NUM_BATCHED_TOKENS = 2048  # with chunked prefill (the LLM class keeps 8192)
RUNTIME_LORA_DISABLED = (
    "Runtime LoRA adapter loading is disabled. Set the environment variable "
    "LORAPLEX_ALLOW_RUNTIME_LORA_UPDATING=True before starting the server to enable "
    "/v1/load_lora_adapter and /v1/unload_lora_adapter.")


@dataclass
class ServerState:
    engine: AsyncLLMEngine
    models: OpenAIServingModels
    completion: OpenAIServingCompletion
    chat: OpenAIServingChat
    tokenization: OpenAIServingTokenization
    metrics: Metrics
    responses: OpenAIServingResponses
    embedding: OpenAIServingEmbedding
    scores: OpenAIServingScores
    classification: OpenAIServingClassification
    generate: ServingGenerate  # LoRAX's / TGI's generate API
    transcription: OpenAIServingTranscription  # Granite Speech's audio
    messages: ServingMessages  # Anthropic's Messages API

    # each route's work, behind its runner / task check: the HTTP routes and run-batch's
    # lines (run_batch.py) both serve through these
    async def serve_completion(self, req: CompletionRequest):
        self.require_runner("generate", "Completions")
        return await self.completion.create_completion(req)

    async def serve_chat(self, req: ChatCompletionRequest):
        self.require_runner("generate", "Chat Completions")
        return await self.chat.create_chat_completion(req)

    async def serve_embedding(self, req: EmbeddingRequest):
        self.require_task("embed", "Embeddings")
        return await self.embedding.create_embedding(req)

    async def serve_classify(self, req: ClassificationRequest):
        self.require_task("classify", "Classification")
        return await self.classification.create_classify(req)

    async def serve_score(self, req: ScoreRequest):
        self.require_scores("Score")
        return await self.scores.create_score(req)

    async def serve_rerank(self, req: RerankRequest):
        self.require_scores("Rerank")
        return await self.scores.rerank(req)

    def require_scores(self, api: str) -> None:
        """Scores come from an embedding model (a bi-encoder) or a one-label classifier (a
        cross-encoder); a classifier of several labels has none (vLLM's 404)."""
        self.require_runner("pooling", api)
        try:
            self.engine.engine.pooling.check_score()
        except ValueError as e:
            raise NotFoundError(f"The model does not support {api} API: {e}") from e

    def require_task(self, task: str, api: str) -> None:
        """A pooling server serves embeddings or classification, as its checkpoint is
        (vLLM's 404 for the other's routes)."""
        self.require_runner("pooling", api)
        ours = self.engine.engine.model_config.pooling_task
        if ours != task:
            raise NotFoundError(f"The model does not support {api} API: this server's "
                                f"model runs the pooling task {ours!r}")

    def require_runner(self, runner: str, api: str) -> None:
        """A generate server has no embeddings, a pooling server no generation: a 404 that
        says so (vLLM registers only the routes its model serves; older vLLMs answered
        "The model does not support <api> API")."""
        if self.engine.engine.model_config.runner != runner:
            raise NotFoundError(f"The model does not support {api} API: this server runs "
                                f"--runner {self.engine.engine.model_config.runner}"
                                + (" (start it with --runner pooling for embeddings)"
                                   if runner == "pooling" else
                                   " (POST /v1/embeddings serves it)"))


def _validation_message(exc: RequestValidationError, content_type: str
                        ) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    if errors[0].get("type") == "json_invalid":
        ctx = errors[0].get("ctx", {}).get("error", "")
        return f"the request body is not valid JSON: {ctx}".rstrip(": "), None
    if tuple(errors[0].get("loc", ())) == ("body",) and "json" not in content_type:
        return ("the request body must be a JSON object sent with 'Content-Type: "
                f"application/json' (got {content_type or 'no Content-Type'!r})"), None
    parts, param = [], None
    for err in errors[:3]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = param or (loc[0] if loc else None)
        where = ".".join(loc) or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more, param


def build_app(state: ServerState, options: HTTPOptions | None = None) -> FastAPI:
    options = options or HTTPOptions()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        yield
        await state.engine.shutdown()

    app = FastAPI(title="loraplex", version=__version__, lifespan=lifespan,
                  **options.fastapi_kwargs())
    app.state.server = state
    metrics = state.metrics

    def failed(resp: JSONResponse) -> JSONResponse:
        metrics.http_errors.labels(str(resp.status_code)).inc()
        return resp

    def shaped(request: Request, message: str, status: int, type_: str | None = None,
               param: str | None = None) -> JSONResponse:
        """The error in its API's shape (the Messages API's routes: Anthropic's)."""
        return failed(shaped_error_response(request.url.path,
                                            request.scope.get("root_path", ""), message,
                                            status, type_, param))

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return shaped(request, exc.message, exc.status, exc.type, exc.param)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc, request.headers.get("content-type", ""))
        return shaped(request, message, 400, "BadRequestError", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return shaped(request, str(exc.detail), exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error")
        return shaped(request, f"internal server error: {exc!r}", 500, "InternalServerError")

    add_middleware(app, options, failed)

    @app.get("/health")
    @app.api_route("/ping", methods=["GET", "POST"])  # SageMaker's health check
    async def health() -> Response:
        try:
            await state.engine.check_health()
        except Exception as e:
            return error_response(str(e), 503, "ServiceUnavailableError")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics")
    def prometheus() -> Response:  # a plain def: rendered on a worker thread, not the loop
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    def list_models() -> JSONResponse:  # a plain def: thousands of cards, off the loop
        return JSONResponse(state.models.show_available_models().model_dump())

    def respond(result) -> Response:
        if hasattr(result, "model_dump"):
            return JSONResponse(result.model_dump())
        return StreamingResponse(result, media_type="text/event-stream")

    @app.post("/v1/completions")
    @with_cancellation
    async def completions(request: CompletionRequest, raw_request: Request) -> Response:
        warn_ignored(request)
        return respond(await state.serve_completion(request))

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> JSONResponse:
        warn_ignored(request)
        return JSONResponse((await state.tokenization.tokenize(request)).model_dump())

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> JSONResponse:
        warn_ignored(request)
        return JSONResponse((await state.tokenization.detokenize(request)).model_dump())

    @app.post("/v1/chat/completions")
    @with_cancellation
    async def chat_completions(request: ChatCompletionRequest, raw_request: Request
                               ) -> Response:
        warn_ignored(request)
        return respond(await state.serve_chat(request))

    def audio_reply(result) -> Response:
        if isinstance(result, str):
            return PlainTextResponse(result)
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream")

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(raw_request: Request) -> Response:
        state.require_runner("generate", "Transcriptions")
        fields = await read_form(raw_request)
        return audio_reply(await state.transcription.create_transcription(fields))

    @app.post("/v1/audio/translations")
    async def translations(raw_request: Request) -> Response:
        state.require_runner("generate", "Translations")
        fields = await read_form(raw_request)
        return audio_reply(await state.transcription.create_transcription(fields,
                                                                          task="translate"))

    @app.post("/v1/embeddings")
    @with_cancellation
    async def embeddings(request: EmbeddingRequest, raw_request: Request) -> Response:
        warn_ignored(request)
        return respond(await state.serve_embedding(request))

    @app.post("/classify")
    @app.post("/v1/classify")
    @with_cancellation
    async def classify(request: ClassificationRequest, raw_request: Request) -> Response:
        warn_ignored(request)
        return respond(await state.serve_classify(request))

    @app.post("/score")
    @app.post("/v1/score")
    @with_cancellation
    async def score(request: ScoreRequest, raw_request: Request) -> Response:
        warn_ignored(request)
        return respond(await state.serve_score(request))

    @app.post("/rerank")
    @app.post("/v1/rerank")
    @app.post("/v2/rerank")
    @with_cancellation
    async def rerank(request: RerankRequest, raw_request: Request) -> Response:
        warn_ignored(request)
        return respond(await state.serve_rerank(request))

    @app.post("/invocations")  # SageMaker's one route: chat or completions by the body
    @with_cancellation
    async def invocations(raw_request: Request) -> Response:
        body = await raw_request.body()
        try:
            fields = json.loads(body)
        except ValueError as e:
            raise BadRequestError(f"the request body is not valid JSON: {e}") from None
        pooling = state.engine.engine.model_config.runner == "pooling"
        if pooling and isinstance(fields, dict) and "input" in fields:
            if state.engine.engine.model_config.pooling_task == "classify":
                return respond(await state.classification.create_classify(
                    parse_body(body, ClassificationRequest)))
            request = parse_body(body, EmbeddingRequest)
            return respond(await state.embedding.create_embedding(request))
        if not isinstance(fields, dict) or not ({"messages", "prompt", "prompt_embeds"}
                                                 & fields.keys()):
            raise BadRequestError("/invocations takes an embedding request (with 'input')"
                                  if pooling else "/invocations takes a chat request (with "
                                  "'messages') or a completion request (with 'prompt')")
        state.require_runner("generate", "Chat Completions" if "messages" in fields
                             else "Completions")
        if "messages" in fields:
            request = parse_body(body, ChatCompletionRequest)
            return respond(await state.chat.create_chat_completion(request))
        request = parse_body(body, CompletionRequest)
        return respond(await state.completion.create_completion(request))

    @app.post("/generate")
    @app.post("/generate_stream")
    @app.post("/")
    @with_cancellation
    async def generate(raw_request: Request) -> Response:
        """LoRAX's / TGI's generate API; its errors in their shape."""
        path = raw_request.url.path.removeprefix(raw_request.scope.get("root_path", ""))
        try:
            request = GenerateRequest.model_validate_json(await raw_request.body())
        except ValidationError as e:
            return failed(JSONResponse(ErrorBody(
                error=_validation_message(RequestValidationError(e.errors(include_url=False)),
                                          "application/json")[0],
                error_type="validation").model_dump(), status_code=422))
        stream = path.endswith("/generate_stream") or (path.rstrip("/") == "" and
                                                       request.stream)
        try:
            state.require_runner("generate", "Generate")
            result = await state.generate.generate(request, stream)
        except APIError as e:
            return failed(JSONResponse(error_body(e).model_dump(), status_code=error_status(e)))
        if stream:
            return StreamingResponse(result, media_type="text/event-stream")
        body = result.model_dump()
        return JSONResponse([body] if path.rstrip("/") == "" else body)  # TGI's "/": a list

    @app.post("/v1/responses")
    @with_cancellation
    async def responses(request: ResponsesRequest, raw_request: Request) -> Response:
        state.require_runner("generate", "Responses")
        warn_unused(request)
        return respond(await state.responses.create_response(request))

    @app.post("/v1/messages")
    @with_cancellation
    async def messages(request: MessagesRequest, raw_request: Request) -> Response:
        """Anthropic's Messages API; its errors in Anthropic's shape (the handlers above
        shape them by path)."""
        state.require_runner("generate", "Messages")
        warn_unused(request)
        result = await state.messages.create_message(request)
        if hasattr(result, "model_dump"):
            return JSONResponse(result.model_dump())
        return StreamingResponse(result, media_type="text/event-stream")

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: CountTokensRequest) -> JSONResponse:
        state.require_runner("generate", "Messages")
        warn_unused(request)
        return JSONResponse((await state.messages.count_tokens(request)).model_dump())

    @app.get("/v1/responses/{response_id}")
    async def retrieve_response(response_id: str) -> JSONResponse:
        return JSONResponse(state.responses.retrieve(response_id).model_dump())

    def require_runtime_updating() -> None:
        if not envs.LORAPLEX_ALLOW_RUNTIME_LORA_UPDATING:
            raise NotFoundError(RUNTIME_LORA_DISABLED)

    async def adapter_body(raw: Request, model: type[T]) -> T:
        """Parse after the enable check, so a disabled route is a 404 whatever the body."""
        if not envs.LORAPLEX_ALLOW_RUNTIME_LORA_UPDATING:
            raise NotFoundError(RUNTIME_LORA_DISABLED)
        return parse_body(await raw.body(), model)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(raw_request: Request) -> Response:
        req = await adapter_body(raw_request, LoadLoRAAdapterRequest)
        return PlainTextResponse(await state.models.load_lora_adapter(
            req.lora_name, req.lora_path, req.load_inplace, req.base_model_name))

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(raw_request: Request) -> Response:
        req = await adapter_body(raw_request, UnloadLoRAAdapterRequest)
        return PlainTextResponse(await state.models.unload_lora_adapter(req.lora_name))

    if envs.LORAPLEX_SERVER_DEV_MODE:  # vLLM's VLLM_SERVER_DEV_MODE routes
        @app.post("/reset_prefix_cache")
        async def reset_prefix_cache() -> Response:
            if not await state.engine.reset_prefix_cache():
                raise ConflictError("the prefix cache was not reset: requests are running")
            return Response(status_code=200)

    return app


# ---- start-up ---------------------------------------------------------------------------
def parse_body(body: bytes, model: type[T]) -> T:
    """A JSON body as `model` (its errors as FastAPI's: a 400 with the reason)."""
    try:
        request = model.model_validate_json(body)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False)) from None
    warn_ignored(request)
    return request


def warn_unused(body: BaseModel) -> None:
    """A request of an API served by the chat route (Responses, Messages): the unknown
    fields that chat does not take either, named in a warning."""
    unused = [k for k in ignored_fields(body) if k not in passed_through(body)]
    if unused:
        logger.warning("The following fields were present in the request but ignored: %s",
                       ", ".join(unused))


def warn_ignored(body: BaseModel) -> None:
    """Unknown fields are accepted, as vLLM does, and named in a warning (vLLM's words)."""
    extra = ignored_fields(body)
    if extra:
        logger.warning("The following fields were present in the request but ignored: %s",
                       ", ".join(extra))


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _setup_logging() -> None:
    level = envs.LORAPLEX_LOGGING_LEVEL
    logging.basicConfig(level=getattr(logging, level, logging.INFO),
                        format="%(levelname)s %(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


def _engine_args(args: argparse.Namespace) -> EngineArgs:
    names = EngineArgs.field_names() - {"model"}
    kw = {n: getattr(args, n) for n in names if hasattr(args, n)}
    if "cpu_kv_cache_gib" not in kw and envs.LORAPLEX_CPU_KVCACHE_SPACE is not None:
        kw["cpu_kv_cache_gib"] = envs.LORAPLEX_CPU_KVCACHE_SPACE
    if "max_num_batched_tokens" not in kw and kw.get("enable_chunked_prefill") is not False:
        # vLLM's server default: short steps keep the streams' inter-token latency low
        kw["max_num_batched_tokens"] = SERVER_MAX_NUM_BATCHED_TOKENS
    return EngineArgs(model=args.model, **kw)


def _chat_template(value: str | None) -> str | None:
    if value is None:
        return None
    if os.path.isfile(value):
        return Path(value).read_text()
    if "{{" in value or "{%" in value:
        return value
    raise CLIError(f"--chat-template {value!r}: no such file, and not a Jinja template")


def _server_tokenizer(engine: LLMEngine):
    """A tokenizer of our own: HF fast tokenizers must not be shared across threads."""
    try:
        return engine.load_tokenizer()
    except Exception:
        return copy.deepcopy(engine.tokenizer)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise CLIError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


async def build_state(args: argparse.Namespace) -> ServerState:
    """Plugins, engine, start-up adapters: every user mistake becomes a CLIError."""
    try:
        load_general_plugins()
    except PluginError as e:
        raise CLIError(_one_line(e)) from None
    if args.lora_modules and not getattr(args, "enable_lora", False):
        raise CLIError("--lora-modules needs --enable-lora")
    for m in args.lora_modules:  # a missing path fails now, not after the model loads
        try:
            local_adapter_dir(LoRARequest(m.name, 1, m.path))
        except LoRAError as e:
            raise CLIError(f"--lora-modules {m.name}={m.path}: {_one_line(e)}") from None
    chat_template = _chat_template(args.chat_template)
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise CLIError("--enable-auto-tool-choice needs --tool-call-parser (one of "
                       + ", ".join(TOOL_CALL_PARSERS) + ")")
    parser = args.tool_call_parser if args.enable_auto_tool_choice else None
    # no `_created` sample beside every series (half the lines of a per-adapter counter);
    # process-wide, so the server sets it, not the Metrics class
    disable_created_metrics()
    try:
        engine_args = _engine_args(args)
        names = engine_args.served_model_name or [args.model]
        names = [names] if isinstance(names, str) else list(names)
        metrics = Metrics(names[0], per_adapter_latency=args.per_adapter_latency_metrics)
        # built on the engine's own thread, which steps it (worker/cpu_threads.py)
        async_engine = AsyncLLMEngine.from_engine_args(engine_args, model_name=names[0],
                                                       metrics=metrics)
    except Exception as e:
        if envs.LORAPLEX_LOGGING_LEVEL == "DEBUG":
            logger.exception("engine start-up failed")
        raise CLIError(f"cannot start the engine for {args.model!r}: {_one_line(e)}") from None
    engine = async_engine.engine
    models = OpenAIServingModels(async_engine, names, engine.model_config.max_model_len,
                                 engine.lora_config is not None)
    tokenizer = _server_tokenizer(engine)
    if chat_template is not None and getattr(tokenizer, "is_mistral", False):
        raise CLIError("--chat-template cannot be used with Mistral's tokenizer "
                       "(tokenizer_mode 'mistral'): mistral_common encodes the chat, as in vLLM")
    details = args.enable_prompt_tokens_details
    chat = OpenAIServingChat(async_engine, models, tokenizer, chat_template=chat_template,
                             tool_call_parser=parser,
                             reasoning_parser=engine.model_config.reasoning_parser,
                             response_role=args.response_role,
                             enable_prompt_tokens_details=details)
    embedding = OpenAIServingEmbedding(async_engine, models, tokenizer, chat=chat)
    state = ServerState(
        engine=async_engine, models=models,
        completion=OpenAIServingCompletion(async_engine, models, tokenizer,
                                           enable_prompt_tokens_details=details), chat=chat,
        tokenization=OpenAIServingTokenization(chat), metrics=metrics,
        responses=OpenAIServingResponses(chat, envs.LORAPLEX_RESPONSES_API_STORE_SIZE
                                         if envs.LORAPLEX_ENABLE_RESPONSES_API_STORE else 0),
        embedding=embedding, scores=OpenAIServingScores(embedding),
        classification=OpenAIServingClassification(embedding),
        generate=ServingGenerate(async_engine, models, tokenizer),
        transcription=OpenAIServingTranscription(async_engine, models, tokenizer),
        messages=ServingMessages(chat))
    for m in args.lora_modules:
        try:
            await models.load_lora_adapter(m.name, m.path, base_model_name=m.base_model_name)
        except APIError as e:
            raise CLIError(f"--lora-modules {m.name}={m.path}: {_one_line(e)}") from None
    for modality, req in engine.default_mm_loras.items():  # listed by modality, as vLLM's
        try:
            await models.serve_registered(modality, req)
        except APIError as e:
            raise CLIError(f"--default-mm-loras {modality}: {_one_line(e)}") from None
    return state


async def run_server(args: argparse.Namespace) -> None:
    options = HTTPOptions.from_args(args)
    for flag, path in (("--ssl-keyfile", options.ssl_keyfile),
                       ("--ssl-certfile", options.ssl_certfile),
                       ("--ssl-ca-certs", options.ssl_ca_certs)):
        if path and not os.path.isfile(path):
            raise CLIError(f"{flag} {path}: no such file")
    if options.ssl_keyfile and not options.ssl_certfile:
        raise CLIError("--ssl-keyfile needs --ssl-certfile (the certificate to serve)")
    sock = _bind(args.host, args.port)
    state = await build_state(args)
    app = build_app(state, options)
    config = uvicorn.Config(app, log_level=args.uvicorn_log_level, timeout_keep_alive=5,
                            access_log=args.uvicorn_log_level in ("debug", "trace"),
                            **options.uvicorn_kwargs())
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]

    async def announce() -> None:
        while not server.started:
            await asyncio.sleep(0.05)
        adapters = ", ".join(f"{n} ({r.lora_path})" for n, r in
                             state.models.lora_requests.items()) or "none"
        where = f"[{host}]" if ":" in host else host
        print(f"loraplex: serving {state.models.base_model_name} at "
              f"{options.scheme}://{where}:{port}{options.root_path} "
              f"(LoRA adapters: {adapters})", flush=True)

    task = asyncio.create_task(announce())
    try:
        await server.serve(sockets=[sock])
    finally:
        task.cancel()
        sock.close()


def serve(args: argparse.Namespace) -> int:
    """``loraplex serve``: returns the exit status; CLIError for user mistakes."""
    _setup_logging()
    asyncio.run(run_server(args))
    return 0
