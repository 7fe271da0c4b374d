"""Every error leaves the server as an OpenAI error object, with a status code that fits.

The body also carries the message as a top-level `detail`: Xinference's own client (and FastAPI-style
clients) read `detail`, OpenAI's SDK reads `error`; both then show the real cause.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("ragserve")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    421: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable",
    504: "service_unavailable",
}


class APIError(Exception):
    def __init__(self, status_code: int, message: str, *, code: Optional[str] = None,
                 param: Optional[str] = None, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers


def error_body(status_code: int, message: str, code: Optional[str] = None,
               param: Optional[str] = None) -> dict[str, Any]:
    default_type = "invalid_request_error" if status_code < 500 else "server_error"
    return {"error": {"message": message, "type": ERROR_TYPES.get(status_code, default_type),
                      "param": param, "code": code},
            "detail": message}


def error_response(status_code: int, message: str, code: Optional[str] = None,
                   param: Optional[str] = None, headers: Optional[dict[str, str]] = None) -> JSONResponse:
    return JSONResponse(error_body(status_code, message, code, param), status_code=status_code, headers=headers)


def model_not_found(name: str, available: list[str]) -> APIError:
    known = ", ".join(available) if available else "none are running"
    return APIError(404, f"model {name!r} is not running; launched models: {known}. "
                         f"Launch it with `ragserve launch --model-name {name} ...` or fix the model name.",
                    code="model_not_found", param="model")


def describe_validation_errors(errors) -> tuple[str, Optional[str]]:
    """(message, first offending field) from pydantic's or FastAPI's list of validation errors."""
    problems = []
    first_param = None
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        first_param = first_param or where
        if err.get("type") == "json_invalid":
            return ("the request body is not valid JSON: send a JSON object with Content-Type: application/json",
                    None)
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        problems.append(f"{where}: {msg}")
    return "invalid request: " + "; ".join(problems[:5]), first_param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status_code, exc.message, exc.code, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_errors(exc.errors())
        return error_response(400, message, "invalid_request", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = "no such route: see /docs for the routes this server offers"
        if exc.status_code == 405:
            message = "method not allowed on this route: see /docs"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}. "
                                   "This is a bug; the server log has the traceback.")
