"""Errors the server reports to clients, each with its HTTP status and OpenAI error type.

The app maps exceptions to responses by type only: an `APIError` carries a message written for the
client; anything else is an internal error and the client sees a generic 500 (bad input gets a clear
error; a bug's details stay in the server's log).
"""

from __future__ import annotations

__all__ = ["APIError", "InvalidRequest", "QueueFull", "Unavailable", "error_body"]


class APIError(Exception):
    """An error whose message is safe and useful to show the client."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


class InvalidRequest(APIError, ValueError):
    """The request is well-formed JSON but asks for something this server refuses (400)."""

    status, type, code = 400, "invalid_request_error", "invalid_request"


class QueueFull(APIError):
    """`max_queue` requests are already waiting (429); the client should retry later."""

    status, type, code = 429, "rate_limit_error", "queue_full"


class Unavailable(APIError):
    """The batching worker is not running: not started yet or shutting down (503)."""

    status, type, code = 503, "server_error", "unavailable"


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    """The OpenAI error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
