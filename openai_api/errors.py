"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and the one place the SDK's
exceptions (gRPC status codes) become HTTP statuses.

| gRPC status (SDK exception)           | HTTP | type                    |
| ------------------------------------- | ---- | ----------------------- |
| INVALID_ARGUMENT, OUT_OF_RANGE        | 400  | invalid_request_error   |
| UNAUTHENTICATED                       | 401  | authentication_error    |
| PERMISSION_DENIED                     | 403  | permission_error        |
| NOT_FOUND                             | 404  | not_found_error         |
| RESOURCE_EXHAUSTED                    | 429  | rate_limit_error        |
| UNAVAILABLE                           | 503  | service_unavailable     |
| DEADLINE_EXCEEDED                     | 504  | timeout                 |
| anything else                         | 500  | server_error            |

`code` is the gRPC status name in lower case (`out_of_range`), or for the front's own refusals a short
reason (`invalid_api_key`, `unsupported_parameter`, `model_not_found`, ...).
"""

from __future__ import annotations

import logging

from specdec_client import SpecDecError

log = logging.getLogger(__name__)

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error", 502: "server_error",
         503: "service_unavailable", 504: "timeout"}

STATUS_OF_GRPC = {"INVALID_ARGUMENT": 400, "OUT_OF_RANGE": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403,
                  "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code)


def from_sdk(error: SpecDecError, orchestrator: str) -> ApiError:
    """The HTTP error for an SDK exception. Where the fault is the deployment's (the orchestrator down, or
    refusing this server's own credentials), the caller gets a plain message and the log gets the details
    (they name internal addresses)."""
    name = getattr(error.code, "name", str(error.code))
    status = STATUS_OF_GRPC.get(name, 500)
    details = error.details or name
    if status == 400:
        # The orchestrator names the request field; this API calls it max_tokens.
        message = details.replace("max_new_tokens", "max_tokens")
        return ApiError(400, message, "max_tokens" if "max_tokens" in message else None, name.lower())
    if status in (401, 403, 503):
        log.warning("orchestrator %s: %s: %s", orchestrator, name, details)
        # The caller's own key was checked before this: here the orchestrator refused the server's credentials.
        message = ("the orchestrator is unavailable; try again later" if status == 503 else
                   "the orchestrator refused this API server's credentials: its operator must fix "
                   "--orchestrator-api-key-file / --tls-*")
        return ApiError(status, message, None, name.lower())
    return ApiError(status, details, None, name.lower())
