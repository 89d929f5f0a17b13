"""Errors the server returns, all in OpenAI's body: {"error": {message, type, param, code}}.

Serving code raises APIError subclasses; api_server turns them (and FastAPI's own
validation/HTTP errors) into JSON responses. Anything else is a 500 and a logged bug.
"""

from __future__ import annotations

from http import HTTPStatus

from fastapi.responses import JSONResponse

from loraplex.entrypoints.protocol import ErrorInfo, ErrorResponse


class APIError(Exception):
    status: HTTPStatus = HTTPStatus.BAD_REQUEST
    type: str = "BadRequestError"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def to_response(self) -> ErrorResponse:
        return error_body(self.message, self.type, self.status, self.param)


class BadRequestError(APIError):
    pass


class NotFoundError(APIError):
    status = HTTPStatus.NOT_FOUND
    type = "NotFoundError"


class AuthenticationError(APIError):
    status = HTTPStatus.UNAUTHORIZED
    type = "AuthenticationError"


class ConflictError(APIError):
    status = HTTPStatus.CONFLICT
    type = "ConflictError"


class ServiceUnavailableError(APIError):
    status = HTTPStatus.SERVICE_UNAVAILABLE
    type = "ServiceUnavailableError"


class InternalServerError(APIError):
    status = HTTPStatus.INTERNAL_SERVER_ERROR
    type = "InternalServerError"


_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
          404: "NotFoundError", 405: "MethodNotAllowedError", 409: "ConflictError",
          413: "BadRequestError", 415: "BadRequestError", 422: "BadRequestError",
          429: "RateLimitError"}


def error_body(message: str, type_: str | None, status: int, param: str | None = None
               ) -> ErrorResponse:
    status = int(status)
    return ErrorResponse(error=ErrorInfo(
        message=message, type=type_ or _TYPES.get(status, "InternalServerError"),
        param=param, code=status))


def error_response(message: str, status: int, type_: str | None = None,
                   param: str | None = None) -> JSONResponse:
    body = error_body(message, type_, status, param)
    return JSONResponse(body.model_dump(), status_code=int(status))


# Anthropic's Messages API (/v1/messages) has its own body, and its error types by status
ANTHROPIC_PATH = "/v1/messages"
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                    403: "permission_error", 404: "not_found_error",
                    405: "invalid_request_error", 413: "request_too_large",
                    415: "invalid_request_error", 422: "invalid_request_error",
                    429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error",
                    529: "overloaded_error"}


def anthropic_error_body(message: str, status: int) -> dict:
    """Anthropic's error body: {"type": "error", "error": {"type", "message"}} (a status
    it has no type for, 500 among them: "api_error")."""
    return {"type": "error", "error": {
        "type": _ANTHROPIC_TYPES.get(int(status), "api_error"), "message": message}}


def is_anthropic_path(path: str, root_path: str = "") -> bool:
    """Whether a request's path (with or without the proxy's --root-path) is one of the
    Messages API's, whose errors take Anthropic's shape."""
    if root_path and path.startswith(root_path):
        path = path[len(root_path):]
    return path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/")


def shaped_error_response(path: str, root_path: str, message: str, status: int,
                          type_: str | None = None, param: str | None = None
                          ) -> JSONResponse:
    """An error in the shape of the API the path belongs to: Anthropic's for the Messages
    API, OpenAI's for the rest."""
    if is_anthropic_path(path, root_path):
        return JSONResponse(anthropic_error_body(message, status), status_code=int(status))
    return error_response(message, status, type_, param)
