"""Typed errors. The API maps them, in one place, to
{"error": {"message", "type", "param", "code"}} with the status code they carry."""
from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class TuneserveError(Exception):
    status_code = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 details: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.details = details or []

    def to_body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"message": self.message, "type": self.type,
                               "param": self.param, "code": self.code}
        if self.details:
            err["details"] = self.details
        return {"error": err}


class InvalidInput(TuneserveError):
    """Bad request content; `param` names the field (and `details` every problem)."""
    status_code = 400
    type = "invalid_request_error"
    code = "invalid_value"

    @classmethod
    def from_problems(cls, problems: list[dict[str, Any]]) -> "InvalidInput":
        """One error listing every problem ({"param", "message"} each, at least one); `param`
        is the first one's, so a client that reads only `param` still gets a field."""
        message = "; ".join(f"{p['param']}: {p['message']}" for p in problems)
        return cls(message, param=problems[0]["param"], details=problems)


class Unauthorized(TuneserveError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(TuneserveError):
    status_code = 404
    type = "invalid_request_error"
    code = "not_found"


class UnknownCursor(NotFound):
    """A list's `after` names none of its objects (unknown, deleted, or another tenant's)."""

    def __init__(self, what: str, after: str):
        super().__init__(f"after: no {what} {after!r} in this list", param="after")


class Conflict(TuneserveError):
    status_code = 409
    type = "invalid_request_error"
    code = "conflict"


class PayloadTooLarge(TuneserveError):
    status_code = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class QueueFull(TuneserveError):
    status_code = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str = "server busy, retry later", *, retry_after: float = 1.0, **kw):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class ServiceUnavailable(TuneserveError):
    status_code = 503
    type = "server_error"
    code = "unavailable"


class RequestTimeout(TuneserveError):
    status_code = 504
    type = "server_error"
    code = "timeout"


class AdapterMismatch(TuneserveError):
    """Adapter trained for another base model or with modules the engine cannot serve."""
    status_code = 409
    type = "invalid_request_error"
    code = "adapter_mismatch"


class IntegrityError(TuneserveError):
    """On-disk artifact does not match its manifest (sha256)."""
    status_code = 500
    type = "server_error"
    code = "integrity_error"


class TrainingError(TuneserveError):
    """A training job failed; `code` is one of out_of_memory, invalid_data, model_not_found, internal."""
    status_code = 500
    type = "server_error"
    code = "internal"


class Cancelled(TuneserveError):
    status_code = 409
    type = "invalid_request_error"
    code = "cancelled"


def unknown_key_message(key: str, known: Iterable[str]) -> str:
    """What to tell a client who sent a key no schema has: the closest known one, if any (a
    typo such as n_epoch), else every key accepted there."""
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"unknown key {key!r}: did you mean {close[0]}?"
    return f"unknown key {key!r} (accepted: {', '.join(known)})"
