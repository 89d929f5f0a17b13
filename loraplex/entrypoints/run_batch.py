"""`loraplex run-batch`: vLLM's batch runner (`vllm run-batch`). An OpenAI batch file in,
a result file out:

    {"custom_id": "a1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
    (/v1/completions, and on a --runner pooling model /v1/embeddings, /score and
    /rerank, or a classifier's /classify, too)
    -> {"id": "batch-...", "custom_id": "a1", "response": {"status_code": 200,
        "request_id": "...", "body": {<the route's response>}}, "error": null}

Every request goes through the server's own serving code (api_server.build_state: the
same validation, adapters by `model`, `--lora-modules`, resolvers), all of them in flight
at once (up to twice --max-num-seqs), so requests for different adapters share batches.
Results are written in input order as they complete. A request that fails (a malformed
line, an unknown model or URL, a bad body, `stream: true`) gets its own line with the
HTTP status and OpenAI's error object; the others carry on. Input and output may be
local paths or http(s) URLs (GET, and PUT for the output).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import tempfile
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, ValidationError
from tqdm import tqdm

from loraplex.entrypoints.api_server import ServerState, _setup_logging, build_state
from loraplex.entrypoints.cli import CLIError
from loraplex.entrypoints.errors import (
    APIError,
    BadRequestError,
    InternalServerError,
    NotFoundError,
)
from loraplex.entrypoints.protocol import (
    ChatCompletionRequest,
    ClassificationRequest,
    CompletionRequest,
    EmbeddingRequest,
    RerankRequest,
    ScoreRequest,
    random_id,
)

logger = logging.getLogger(__name__)


class BatchRequestInput(BaseModel):
    """One line of the input file (OpenAI's batch input format)."""

    custom_id: str
    method: str = "POST"
    url: str
    body: dict[str, Any]


class BatchResponseData(BaseModel):
    status_code: int = 200
    request_id: str
    body: dict[str, Any] | None = None


class BatchRequestOutput(BaseModel):
    """One line of the output file: the response, or the error with its status."""

    id: str
    custom_id: str | None
    response: BatchResponseData | None
    error: dict[str, Any] | None = None


Handler = Callable[[ServerState, Any], Awaitable[Any]]


# url -> (its body, the route's work: ServerState's, which refuses a server of another
# runner or task as the routes do)
ROUTES: dict[str, tuple[type[BaseModel], Handler]] = {
    "/v1/chat/completions": (ChatCompletionRequest, ServerState.serve_chat),
    "/v1/completions": (CompletionRequest, ServerState.serve_completion),
    "/v1/embeddings": (EmbeddingRequest, ServerState.serve_embedding),
    **{url: (ScoreRequest, ServerState.serve_score) for url in ("/score", "/v1/score")},
    **{url: (RerankRequest, ServerState.serve_rerank)
       for url in ("/rerank", "/v1/rerank", "/v2/rerank")},
    **{url: (ClassificationRequest, ServerState.serve_classify)
       for url in ("/classify", "/v1/classify")},
}


def _output(custom_id: str | None, body: BaseModel | None = None,
            error: APIError | None = None) -> BatchRequestOutput:
    status = int(error.status) if error is not None else 200
    return BatchRequestOutput(
        id=random_id("batch"), custom_id=custom_id,
        response=BatchResponseData(status_code=status, request_id=random_id("batch-req"),
                                   body=body.model_dump() if body is not None else None),
        error=error.to_response().error.model_dump() if error is not None else None)


def _custom_id(line: str) -> str | None:
    """The custom_id of a line that does not validate, when there is one to tell."""
    try:
        value = json.loads(line).get("custom_id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


async def run_request(state: ServerState, line: str) -> BatchRequestOutput:
    """One input line through its route; every failure is this line's result."""
    try:
        request = BatchRequestInput.model_validate_json(line)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        where = ".".join(map(str, err["loc"])) or "line"
        return _output(_custom_id(line), error=BadRequestError(
            f"not a batch request line: {where}: {err['msg']}"))
    try:
        if request.method.upper() != "POST":
            raise BadRequestError(f"method {request.method!r}: only POST is supported",
                                  param="method")
        if request.url not in ROUTES:
            raise NotFoundError(f"URL {request.url} is not supported here: "
                                f"{', '.join(ROUTES)}")
        model, handler = ROUTES[request.url]
        try:
            body = model.model_validate(request.body)
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            param = ".".join(map(str, err["loc"]))
            raise BadRequestError(f"{param}: {err['msg']}", param=param or None) from None
        if getattr(body, "stream", False):
            raise BadRequestError("a batch request must not be sent in stream mode",
                                  param="stream")
        return _output(request.custom_id, await handler(state, body))
    except APIError as e:
        return _output(request.custom_id, error=e)
    except Exception as e:  # a bug: this line's, logged; the others go on
        logger.exception("batch request %s failed", request.custom_id)
        return _output(request.custom_id, error=InternalServerError(f"internal error: {e!r}"))


def read_lines(path_or_url: str) -> list[str]:
    """The input's non-empty lines: a local file, or an http(s) URL fetched with GET."""
    if path_or_url.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(path_or_url, timeout=60) as resp:
                text = resp.read().decode("utf-8")
        except OSError as e:
            raise CLIError(f"--input-file {path_or_url}: {e}") from None
    else:
        try:
            with open(path_or_url, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise CLIError(f"--input-file {path_or_url}: {e.strerror or e}") from None
    return [line for line in text.splitlines() if line.strip()]


def upload(url: str, path: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    request = urllib.request.Request(url, data=data, method="PUT",
                                     headers={"Content-Type": "application/jsonl"})
    try:
        with urllib.request.urlopen(request, timeout=300):
            pass
    except OSError as e:  # an HTTP error status too
        raise CLIError(f"--output-file {url}: the upload failed: {e}") from None


class OrderedWriter:
    """Results written in input order as soon as every earlier one is there."""

    def __init__(self, f) -> None:
        self.f, self.next, self.pending = f, 0, {}

    def add(self, index: int, result: BatchRequestOutput) -> None:
        self.pending[index] = result
        while self.next in self.pending:
            self.f.write(self.pending.pop(self.next).model_dump_json() + "\n")
            self.next += 1


async def run_batch(args: argparse.Namespace) -> None:
    lines = read_lines(args.input_file)
    state = await build_state(args)
    if args.enable_metrics:
        from prometheus_client import start_http_server
        start_http_server(args.port, addr=args.url, registry=state.metrics.registry)
        logger.info("Prometheus metrics at http://%s:%d/metrics", args.url, args.port)
    upload_to = args.output_file if args.output_file.startswith(("http://", "https://")) \
        else None
    out_path = args.output_file
    if upload_to:
        fd, out_path = tempfile.mkstemp(suffix=".jsonl", dir=args.output_tmp_dir)
        os.close(fd)
    limit = asyncio.Semaphore(2 * state.engine.engine.config.scheduler_config.max_num_seqs)
    state.engine.start()
    try:
        with open(out_path, "w", encoding="utf-8") as f, \
                tqdm(total=len(lines), desc="Running batch", unit="req", disable=None) as bar:
            writer = OrderedWriter(f)

            async def one(index: int, line: str) -> None:
                async with limit:
                    writer.add(index, await run_request(state, line))
                bar.update()
            await asyncio.gather(*(one(i, line) for i, line in enumerate(lines)))
        if upload_to:
            upload(upload_to, out_path)
    finally:
        await state.engine.shutdown()
        if upload_to:
            os.unlink(out_path)
    logger.info("Batch done: %d requests, results in %s", len(lines), args.output_file)


def main(args: argparse.Namespace) -> int:
    """``loraplex run-batch``: returns the exit status; CLIError for user mistakes."""
    _setup_logging()
    asyncio.run(run_batch(args))
    return 0
