"""JSON errors for the REST API, and input decoding that turns every bad input into a 400.

Error body: `{"success": false, "error": "<what is wrong>", "details": {...}}`. A message
names the parameter or body field and what it expects (`minScore must be a whole number
from 0 to 100`). Only a fault of the service itself is a 500; an unreachable database is
a 503.
"""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from aiohttp import web
from loguru import logger

from handlers.app_context import context
from handlers.body import BodyError, read_limited
from handlers.principal import bound_account
from service.adapters.failures import http_failure
from service.usecases.intake_guard import bounded

T = TypeVar("T", bound=msgspec.Struct)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_BODY_BYTES = 1024 * 1024
_encoder = msgspec.json.Encoder()

# Friendlier words than the type for fields whose pattern says little to a person.
_EXPECT_OVERRIDES = {"phone": "a phone number with 7 to 15 digits, e.g. +7 701 234 56 01"}
_NO_NUL = r"^[^\x00]*$"


class ApiError(Exception):
    def __init__(self, status: int, error: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.details = details


def error_response(
    status: int,
    error: str,
    details: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body: dict[str, Any] = {"success": False, "error": error}
    if details is not None:
        body["details"] = details
    return web.Response(
        status=status, body=_encoder.encode(body), content_type="application/json", headers=headers
    )


def json_response(payload: msgspec.Struct, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=_encoder.encode(payload), content_type="application/json"
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Exception as exc:
        return failure_response(request, exc)


def failure_response(request: web.Request, exc: Exception) -> web.Response:
    """The JSON answer to an exception a handler raised (re-raised when it is none)."""
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.error, exc.details)
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        return _http_error(request, exc)
    failure = http_failure(exc)
    if failure is not None:
        logger.warning("dependency unavailable: {}: {}", type(exc).__name__, exc)
        return error_response(*failure)
    logger.opt(exception=exc).error("unhandled error in {} {}", request.method, request.path)
    return error_response(500, "internal error")


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    headers: dict[str, str] = {}
    # The path is echoed, bounded (the query string, which may hold a token, never is).
    path = bounded(request.path, 100)
    method = bounded(request.method, 20)
    if exc.status == 404:
        message = f"no such endpoint: {method} {path}"
    elif exc.status == 405:
        message = f"method {method} not allowed on {path}"
        if "Allow" in exc.headers:
            headers["Allow"] = exc.headers["Allow"]
    elif exc.status == 413:
        message = "request body too large"
    else:
        message = exc.reason
    return error_response(exc.status, message, headers=headers or None)


# -- input decoding ---------------------------------------------------------------------------
def parse_query(request: web.Request, kind: type[T]) -> T:
    """Query parameters as `kind`: strings converted ("70" -> 70, "true" -> True).

    Empty values count as absent (forms send `minScore=`); unknown parameters are
    ignored, as the original did; a parameter given twice is an error.
    """
    try:
        items = list(request.query.items())
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "query string is not valid UTF-8") from None
    known = {f.encode_name for f in msgspec.structs.fields(kind)}
    raw: dict[str, str] = {}
    seen: set[str] = set()
    for key, value in items:
        if key not in known:
            continue
        if key in seen:
            raise ApiError(400, f"{key} is given more than once", {"field": key})
        seen.add(key)
        if value != "":
            raw[key] = value
    account = bound_account(request)
    if account is not None and _ACCOUNT in known:
        raw.setdefault(_ACCOUNT, str(account))  # a bound credential names the account
    try:
        return _checked_account(request, msgspec.convert(raw, kind, strict=False))
    except msgspec.ValidationError as exc:
        raise explain(exc, kind, where="query parameter") from None


_ACCOUNT = "userAccountId"


def _checked_account(request: web.Request, value: T) -> T:
    """404 when a bound credential's request names another account (as a foreign lead)."""
    account = bound_account(request)
    given = getattr(value, "user_account_id", None)
    if account is not None and given is not None and given != account:
        raise ApiError(404, "account not found for this credential", {"field": _ACCOUNT})
    return value


def path_uuid(request: web.Request, name: str = "id") -> uuid.UUID:
    value = request.match_info.get(name, "")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ApiError(
            400, f"{name} must be a UUID", {"field": name, "expected": "a UUID"}
        ) from None


async def decode_body(request: web.Request, kind: type[T]) -> T:
    """The JSON body as `kind`: types checked strictly, unknown fields refused."""
    body = await read_body(request)
    if not body.strip():
        raise ApiError(400, "request body must be a JSON object")
    try:
        account = bound_account(request)
        if account is not None and b'"' + _ACCOUNT.encode() + b'"' not in body:
            # A bound credential names the account: the body may leave it out.
            raw = msgspec.json.decode(body)
            if isinstance(raw, dict) and _ACCOUNT in {
                f.encode_name for f in msgspec.structs.fields(kind)
            }:
                raw[_ACCOUNT] = str(account)
            return _checked_account(request, msgspec.convert(raw, kind))
        return _checked_account(request, msgspec.json.decode(body, type=kind))
    except msgspec.ValidationError as exc:
        raise explain(exc, kind, where="field") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {bounded(str(exc))}") from None
    except RecursionError:
        raise ApiError(400, "request body is JSON nested too deeply") from None


async def read_body(request: web.Request, limit: int = MAX_BODY_BYTES) -> bytes:
    try:
        return await read_limited(request, limit, context(request).settings.http_body_timeout)
    except BodyError as exc:
        raise ApiError(exc.status, f"request {exc.message}") from None


_AT = re.compile(r" - at `\$(?:\.([^`.\[]+))?[^`]*`$")
_UNKNOWN = re.compile(r"Object contains unknown field `([^`]+)`")
_MISSING = re.compile(r"Object missing required field `([^`]+)`")


def explain(exc: msgspec.ValidationError, kind: type[msgspec.Struct], where: str) -> ApiError:
    """A 400 naming the field and what it expects, from msgspec's message."""
    text = str(exc)
    fields = _fields(kind)
    located = _AT.search(text)
    if (match := _UNKNOWN.search(text)) and (located is None or located.group(1) is None):
        name = match.group(1)
        return ApiError(
            400,
            f"unknown {where} {name}",
            {"field": name, "allowed": sorted(fields), "reason": text},
        )
    # A value at a field ("... - at `$.score`"), else a field left out.
    name = located.group(1) if located is not None else None
    missing = _MISSING.search(text) if name is None else None
    if missing is not None:
        name = missing.group(1)
    if name is not None:
        expected = _expected(name, fields, where)
        message = (
            f"{name} is required ({expected})" if missing else f"{where} {name} must be {expected}"
        )
        return ApiError(400, message, {"field": name, "expected": expected, "reason": text})
    if where == "field":
        return ApiError(400, "request body must be a JSON object", {"reason": text})
    return ApiError(400, f"invalid {where}s: {text}", {"reason": text})


@functools.cache
def _fields(kind: type[msgspec.Struct]) -> dict[str, msgspec.inspect.Field]:
    info = msgspec.inspect.type_info(kind)
    assert isinstance(info, msgspec.inspect.StructType)
    return {f.encode_name: f for f in info.fields}


def _expected(name: str, fields: dict[str, Any], where: str) -> str:
    if name in _EXPECT_OVERRIDES:
        return _EXPECT_OVERRIDES[name]
    field = fields.get(name)
    if field is None:
        return "a valid value"
    # A query parameter is absent or a value; null exists only in JSON bodies.
    return describe(field.type, nullable=where == "field")


def describe(tp: msgspec.inspect.Type, nullable: bool = True) -> str:
    """What a value of `tp` looks like, in words (`nullable=False`: leave out "or null")."""
    mi = msgspec.inspect
    if isinstance(tp, mi.Metadata):
        return describe(tp.type, nullable)
    if isinstance(tp, mi.UnionType):
        parts = [describe(t) for t in tp.types if not isinstance(t, mi.NoneType)]
        nullable = nullable and any(isinstance(t, mi.NoneType) for t in tp.types)
        return " or ".join(parts + (["null"] if nullable else []))
    if isinstance(tp, mi.BoolType):
        return "true or false"
    if isinstance(tp, mi.IntType):
        return "a whole number" + _range(tp.ge, tp.le, tp.gt, tp.lt)
    if isinstance(tp, mi.FloatType):
        return "a number" + _range(tp.ge, tp.le, tp.gt, tp.lt)
    if isinstance(tp, mi.UUIDType):
        return "a UUID"
    if isinstance(tp, mi.LiteralType):
        return "one of " + ", ".join(str(v) for v in sorted(tp.values, key=str))
    if isinstance(tp, mi.StrType):
        words = "text"
        if tp.min_length:
            words += f" of at least {tp.min_length} character" + ("s" if tp.min_length > 1 else "")
        if tp.max_length is not None:
            words += f"{' and' if tp.min_length else ''} of at most {tp.max_length} characters"
        if tp.pattern == _NO_NUL:
            words += " without NUL characters"
        elif tp.pattern:
            words += f" matching {tp.pattern}"
        return words
    if isinstance(tp, mi.DateTimeType):
        return "an ISO 8601 date-time"
    if isinstance(tp, mi.DictType | mi.StructType):
        return "an object"
    if isinstance(tp, mi.ListType):
        return "a list"
    if isinstance(tp, mi.NoneType):
        return "null"
    return "a valid value"


def _range(ge: Any, le: Any, gt: Any, lt: Any) -> str:
    low = ge if ge is not None else (gt + 1 if gt is not None else None)
    high = le if le is not None else (lt - 1 if lt is not None else None)
    if low is not None and high is not None:
        return f" from {low} to {high}"
    if low is not None:
        return f" of at least {low}"
    if high is not None:
        return f" of at most {high}"
    return ""
