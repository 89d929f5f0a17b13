"""What `loraplex serve` does around the routes, from vLLM's frontend flags: the API key,
CORS (`--allowed-origins`, ...: browsers calling the server from another origin),
`X-Request-Id` headers (`--enable-request-id-headers`), a path prefix behind a proxy
(`--root-path`), no /docs (`--disable-fastapi-docs`) and TLS (`--ssl-*`)."""

from __future__ import annotations

import argparse
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from loraplex import envs
from loraplex.entrypoints.errors import shaped_error_response


@dataclass(frozen=True)
class HTTPOptions:
    api_key: str | None = None  # required on /v1 routes: 'Authorization: Bearer <key>' or
    # 'x-api-key: <key>' (Anthropic's header)
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])
    allowed_credentials: bool = False
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    enable_request_id_headers: bool = False
    root_path: str = ""
    disable_fastapi_docs: bool = False
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    ssl_ca_certs: str | None = None
    ssl_cert_reqs: int = 0  # ssl.CERT_NONE: clients are not asked for a certificate

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> HTTPOptions:
        names = {f for f in cls.__dataclass_fields__ if f != "api_key"}
        return cls(api_key=args.api_key or envs.LORAPLEX_API_KEY,
                   **{n: getattr(args, n) for n in names if hasattr(args, n)})

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_certfile else "http"

    def fastapi_kwargs(self) -> dict:
        docs = {} if not self.disable_fastapi_docs else dict(
            openapi_url=None, docs_url=None, redoc_url=None)
        return dict(root_path=self.root_path, **docs)

    def uvicorn_kwargs(self) -> dict:
        return dict(ssl_keyfile=self.ssl_keyfile,
                    ssl_certfile=self.ssl_certfile, ssl_ca_certs=self.ssl_ca_certs,
                    ssl_cert_reqs=self.ssl_cert_reqs)


def add_middleware(app: FastAPI, options: HTTPOptions,
                   failed: Callable[[JSONResponse], JSONResponse]) -> None:
    """The last added runs first: CORS answers preflights and labels every response (a
    401 too, so a browser can read it), then the request id, then the key check."""
    if options.api_key:
        expected = f"Bearer {options.api_key}".encode()
        key = options.api_key.encode()

        @app.middleware("http")
        async def authenticate(request: Request, call_next):
            path = request.url.path  # the route's, with or without the proxy's prefix
            if options.root_path and path.startswith(options.root_path):
                path = path[len(options.root_path):]
            if request.method == "OPTIONS" or not path.startswith("/v1"):
                return await call_next(request)
            given = request.headers.get("Authorization", "")
            # Anthropic's clients (Claude Code, its SDKs) send the key as x-api-key
            other = request.headers.get("x-api-key")
            if not (secrets.compare_digest(given.encode(), expected) or (
                    other is not None and secrets.compare_digest(other.encode(), key))):
                return failed(shaped_error_response(
                    path, "", "Unauthorized: missing or wrong API key (send 'Authorization: "
                    "Bearer <key>' or 'x-api-key: <key>')", 401, "AuthenticationError"))
            return await call_next(request)

    if options.enable_request_id_headers:
        @app.middleware("http")
        async def request_id_header(request: Request, call_next):
            """The client's X-Request-Id back on the response, or a new one (vLLM's)."""
            request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
            response = await call_next(request)
            response.headers["X-Request-Id"] = request_id
            return response

    app.add_middleware(CORSMiddleware, allow_origins=options.allowed_origins,
                       allow_credentials=options.allowed_credentials,
                       allow_methods=options.allowed_methods,
                       allow_headers=options.allowed_headers)
