"""What every API of the server shares on the wire: errors as JSON with HTTP statuses, request
body fields checked for type and range, and server-sent events."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.responses import JSONResponse

from santacli.errors import ContextLengthError, SantaError, UsageError
from santacli.server.worker import ClientGone

MAX_STOPS = 16
MAX_SEED = 2**63 - 1  # torch generators take a 64-bit seed


# ---------------------------------------------------------------------------------------------
# Errors


class ApiError(Exception):
    """An error answered as JSON with an HTTP status (never a traceback)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def from_exception(exc: BaseException) -> ApiError:
    """Map an engine exception to an HTTP error; SantaError messages are already user-facing."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ClientGone):
        return ApiError(499, "client closed the request")
    if isinstance(exc, (UsageError, ContextLengthError)):
        return ApiError(422, str(exc))
    if isinstance(exc, SantaError):
        return ApiError(500, str(exc), "server_error")
    return ApiError(500, f"internal error ({type(exc).__name__}); see the server log", "server_error")


def tgi_error_type(status: int) -> str:
    fallback = "validation" if status < 500 else "generation"
    return {503: "overloaded", 401: "authentication"}.get(status, fallback)


def error_body(err: ApiError, *, tgi: bool = False) -> dict[str, Any]:
    if tgi:
        # TGI clients (huggingface_hub, llm-ls) read {"error": str, "error_type": str}.
        return {"error": err.message, "error_type": tgi_error_type(err.status)}
    return {"error": {"message": err.message, "type": err.kind, "param": err.param, "code": err.status}}


def error_response(err: ApiError, *, tgi: bool = False) -> JSONResponse:
    headers = {}
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if err.status == 503:
        headers["Retry-After"] = "1"  # the queue drains in seconds
    return JSONResponse(error_body(err, tgi=tgi), status_code=err.status, headers=headers)


# ---------------------------------------------------------------------------------------------
# Request parsing


_MISSING = object()


def field(body: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = _MISSING, *,
          lo: float | None = None, hi: float | None = None, nullable: bool = True) -> Any:
    """``body[key]`` checked for type and range (None counts as absent when ``nullable``)."""
    value = body.get(key, _MISSING)
    if value is _MISSING or (value is None and nullable):
        if default is _MISSING:
            raise ApiError(422, f"'{key}' is required", param=key)
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok and float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        names = " or ".join(k.__name__ for k in kinds).replace("str", "string").replace("float", "number")
        raise ApiError(422, f"'{key}' must be a {names}, got {json.dumps(value)[:60]}", param=key)
    if lo is not None and value < lo:
        raise ApiError(422, f"'{key}' must be >= {lo:g}, got {value}", param=key)
    if hi is not None and value > hi:
        raise ApiError(422, f"'{key}' must be <= {hi:g}, got {value}", param=key)
    return value


def stop_list(body: dict[str, Any], key: str) -> list[str]:
    value = body.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ApiError(422, f"'{key}' must be a string or a list of strings", param=key)
    if len(value) > MAX_STOPS:
        raise ApiError(422, f"'{key}' may hold at most {MAX_STOPS} strings", param=key)
    return [s for s in value if s]


def single_prompt(body: dict[str, Any], *, status: int, quote: str = "'") -> str:
    """``body["prompt"]`` as one string (a one-element list is accepted, as OpenAI clients send)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(status, f"{quote}prompt{quote} must be a string (batches and token arrays are not supported)",
                       param="prompt")
    return prompt


def reject_unsupported(body: dict[str, Any], checks: dict[str, Callable[[Any], bool]]) -> None:
    """Refuse options santa cannot honour instead of silently ignoring them."""
    for key, is_default in checks.items():
        value = body.get(key)
        if value is not None and not is_default(value):
            raise ApiError(422, f"'{key}' is not supported by this server", param=key)


# ---------------------------------------------------------------------------------------------
# Server-sent events


def sse(data: Any) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


def sse_error(exc: BaseException, *, tgi: bool = False) -> bytes:
    err = from_exception(exc)
    if tgi:
        return sse(error_body(err, tgi=True))
    return sse({"error": {"message": err.message, "type": err.kind}})


def unsent(final: str, sent: str) -> str:
    """What a stream still owes its client of ``final`` after sending ``sent``."""
    return final[len(sent):] if final.startswith(sent) else ""
