"""Errors as values: a type, a message and an HTTP status, rendered once as an OpenAI error body."""

from __future__ import annotations

import json
from dataclasses import dataclass
from http import HTTPStatus

from starlette.responses import JSONResponse


@dataclass
class APIError(Exception):
    status: int
    message: str
    type: str = "BadRequestError"
    param: str | None = None
    headers: dict[str, str] | None = None

    def __reduce__(self):  # picklable across Ray processes
        return type(self), (self.status, self.message, self.type, self.param, self.headers)

    def body(self) -> dict:
        # Same shape and `code` convention as vLLM's own ErrorResponse.
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse_event(self) -> bytes:
        """The error as one server-sent event, for failures after a stream has started."""
        return f"data: {json.dumps(self.body())}\n\ndata: [DONE]\n\n".encode()


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(HTTPStatus.BAD_REQUEST, message, "BadRequestError", param)


def not_found(message: str, param: str | None = None) -> APIError:
    return APIError(HTTPStatus.NOT_FOUND, message, "NotFoundError", param)


def unauthorized() -> APIError:
    return APIError(
        HTTPStatus.UNAUTHORIZED,
        "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
        "AuthenticationError",
        headers={"WWW-Authenticate": "Bearer"},
    )


def overloaded(message: str, retry_after_s: int = 1) -> APIError:
    return APIError(
        HTTPStatus.SERVICE_UNAVAILABLE, message, "ServiceUnavailableError", headers={"Retry-After": str(retry_after_s)}
    )


def engine_failed(message: str) -> APIError:
    return APIError(HTTPStatus.INTERNAL_SERVER_ERROR, message, "InternalServerError")
