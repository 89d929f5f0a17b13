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
