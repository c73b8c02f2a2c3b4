"""A PostgREST-compatible HTTP server over a real PostgreSQL database, for tests.

It serves `/rest/v1/...` the way a Supabase project does (its API gateway, then PostgREST),
for the requests supabase-py sends, and enforces what they enforce:

- **Keys and roles.** The gateway wants an `apikey`: a legacy JWT key (HS256, signed with
  the project's JWT secret, the role in its `role` claim) or a new `sb_secret_…` /
  `sb_publishable_…` key (standing for `service_role` / `anon`). `Authorization: Bearer`
  may carry another JWT (a signed-in user). Like PostgREST
  (PostgREST/postgrest `src/library/PostgREST/Query/PreQuery.hs`, `txVarQuery`), every
  request runs in its own transaction, connected as `authenticator`, after
  `set_config('role', <role>, true)` (= SET LOCAL ROLE), `request.jwt.claims`,
  `request.method`, `request.path` and `search_path`: privileges and row level security
  apply as on Supabase.
- **Read-only where PostgREST is** (`src/library/PostgREST/Plan.hs`): GET, and RPC calls of
  STABLE or IMMUTABLE functions, run in a READ ONLY transaction (a write there: 25006 → 405).
- **Schema cache** (`src/library/PostgREST/SchemaCache.hs`): tables and functions of the
  schema are read at start, without a privilege filter, and only again on
  `NOTIFY pgrst, 'reload schema'` (or a bare `NOTIFY pgrst`) — a missing table is
  PGRST205, a missing function PGRST202 (404), never a silent reload.
- **Errors** (`src/library/PostgREST/Error.hs`, `mapSQLtoHTTP`): `{"code", "details",
  "hint", "message"}` with its statuses: 23505 → 409, 42P01 → 404, 22P02 → 400, 08* → 503,
  42501 → 403, or 401 (with `WWW-Authenticate: Bearer`) when the role is the anon role.

Requests: `GET /rest/v1/<table>`: `select=` (column names or `*`), horizontal filters
`col=[not.]op.value` with eq, neq, gt, gte, lt, lte, is, in; `order=col.desc.nullslast,..`;
`limit`, `offset` or a `Range: a-b` header; `Prefer: count=exact` (`Content-Range:
0-9/123`, 206 when partial, 416 past the end); answers capped at `max_rows` (Supabase's
default max-rows is 1,000). `POST /rest/v1/<table>` (insert; `columns=`, `Prefer:
return=representation|minimal`), `PATCH` and `DELETE` with filters (a filter is required,
as pg-safeupdate does on Supabase). `POST /rest/v1/rpc/<function>` with a JSON object of
named arguments (typed through `json_to_record`, as PostgREST does); `select`, filters,
order and limits apply to functions returning rows. Table, column and function names are
checked against the schema cache before they reach SQL; values always travel as query
parameters.

The database must be Supabase-like (tests/supabase_db.py): the server logs in as
`authenticator`. `fail_next()` and `drop_next()` inject transient failures for retry tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import jwt
from aiohttp import web
from asyncpg.pool import PoolConnectionProxy

REST = "/rest/v1"
# The project's JWT secret and its keys (as a Supabase project's API settings list them).
JWT_SECRET = "test-project-jwt-secret-with-at-least-32-characters"
ANON_ROLE = "anon"  # PostgREST's db-anon-role on Supabase


def legacy_key(role: str) -> str:
    """A legacy API key: a long-lived HS256 JWT naming its role, as Supabase issues them."""
    now = int(time.time())
    claims = {"iss": "supabase", "ref": "testproject", "role": role, "iat": now}
    claims["exp"] = now + 10 * 365 * 86400
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


SERVICE_KEY = legacy_key("service_role")
ANON_KEY = legacy_key("anon")
AUTHENTICATED_KEY = legacy_key("authenticated")
SECRET_KEY = "sb_secret_testproject0000000000000000"
PUBLISHABLE_KEY = "sb_publishable_testproject000000000000"
# New-style keys: the gateway swaps them for a JWT of this role.
OPAQUE_KEYS = {SECRET_KEY: "service_role", PUBLISHABLE_KEY: ANON_ROLE}
_STATUS_BY_SQLSTATE = {
    "23503": 409,
    "23505": 409,
    "25006": 405,
    "42883": 404,
    "42P01": 404,
    "53400": 500,
    "P0001": 400,
}
_STATUS_BY_CLASS = {
    "08": 503,
    "09": 500,
    "0L": 403,
    "0P": 403,
    "25": 500,
    "28": 403,
    "2D": 500,
    "38": 500,
    "39": 500,
    "3B": 500,
    "40": 500,
    "53": 503,
    "54": 413,
    "55": 500,
    "57": 500,
    "58": 500,
    "F0": 500,
    "HV": 500,
    "P0": 500,
    "XX": 500,
}
_COMPARISONS = {"eq": "=", "neq": "<>", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
_IS_VALUES = {"null": "NULL", "true": "TRUE", "false": "FALSE", "unknown": "UNKNOWN"}
_RESERVED = frozenset({"select", "order", "limit", "offset", "columns", "on_conflict"})
_RANGE = re.compile(r"^(\d+)-(\d*)$")


class PostgrestError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: str | None = None,
        hint: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {
            "code": code,
            "details": details,
            "hint": hint,
            "message": message,
        }
        if not code:  # an answer of the API gateway, not of PostgREST
            self.body = {"message": message, "hint": hint}
        self.headers = dict(headers or {})


@dataclass
class _Function:
    name: str
    args: list[tuple[str, str]]  # (name, SQL type) in declaration order
    required: int  # the first `required` args have no default
    returns_rows: bool
    row_columns: dict[str, str]  # of the composite it returns (SETOF table), else {}
    read_only: bool  # STABLE or IMMUTABLE: PostgREST calls it in a READ ONLY transaction


@dataclass(frozen=True)
class _Auth:
    role: str
    claims: dict[str, Any]


_AUTH = web.RequestKey("auth", _Auth)


@dataclass
class _Catalog:
    tables: dict[str, dict[str, str]] = field(default_factory=dict)  # table -> column -> type
    functions: dict[str, list[_Function]] = field(default_factory=dict)


def _ident(name: str) -> str:
    """Quote a name that the catalog has confirmed exists."""
    return '"' + name.replace('"', '""') + '"'


class PostgrestServer:
    """Start with `await server.start()` (returns the Supabase-style base URL)."""

    def __init__(self, dsn: str, *, max_rows: int | None = 1000, schema: str = "public") -> None:
        self._dsn = _as_authenticator(dsn)
        self._schema = schema
        self.max_rows = max_rows
        self.requests: list[str] = []  # "METHOD /path?query" of every request
        self._failures: list[int] = []  # statuses to answer next (0 = drop the connection)
        self._catalog = _Catalog()
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._reloading: set[asyncio.Task[None]] = set()
        self.schema_reloads = 0  # schema cache loads after the first (NOTIFY pgrst)
        self._runner: web.AppRunner | None = None
        self.url = ""

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> str:
        self._pool = await asyncpg.create_pool(self._dsn, min_size=1, max_size=10)
        await self._load_catalog()
        # PostgREST LISTENs on channel `pgrst` (docs/references/listener.rst).
        self._listener = await asyncpg.connect(self._dsn)
        await self._listener.add_listener("pgrst", self._on_notify)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", REST + "/rpc/{name}", self._rpc)
        app.router.add_route("*", REST + "/{name}", self._table)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        for task in list(self._reloading):
            await task
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        if payload.strip() in ("", "reload schema"):
            task = asyncio.get_running_loop().create_task(self._reload())
            self._reloading.add(task)
            task.add_done_callback(self._reloading.discard)

    async def _reload(self) -> None:
        await self._load_catalog()
        self.schema_reloads += 1

    def fail_next(self, count: int, status: int = 503) -> None:
        """Answer the next `count` requests with `status` (as a gateway would), unprocessed."""
        self._failures.extend([status] * count)

    def drop_next(self, count: int) -> None:
        """Close the connection of the next `count` requests without an answer."""
        self._failures.extend([0] * count)

    # -- handlers ---------------------------------------------------------------------
    async def _table(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, self._table_request)

    async def _rpc(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, self._rpc_request)

    async def _handle(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append(f"{request.method} {request.path_qs}")
        if self._failures:
            status = self._failures.pop(0)
            if status == 0:
                assert request.transport is not None
                request.transport.close()
                return web.Response(status=500)
            return web.json_response(
                {"message": "upstream unavailable"}, status=status, headers={"Retry-After": "0"}
            )
        auth: _Auth | None = None
        try:
            auth = _authorize(request)
            request[_AUTH] = auth
            response: web.StreamResponse = await handler(request)
            return response
        except PostgrestError as exc:
            return web.json_response(exc.body, status=exc.status, headers=exc.headers)
        except asyncpg.PostgresError as exc:
            assert auth is not None
            return _pg_error_response(exc, auth.role)
        except (OSError, asyncpg.InterfaceError) as exc:
            body = {"code": "PGRST000", "details": str(exc), "hint": None, "message": "no db"}
            return web.json_response(body, status=503)

    async def _table_request(self, request: web.Request) -> web.StreamResponse:
        table = request.match_info["name"]
        columns = await self._table_columns(table)
        if request.method == "GET":
            source = f"{_ident(self._schema)}.{_ident(table)}"
            return await self._read(request, source, columns, [], read_only=True)
        if request.method == "POST":
            return await self._insert(request, table, columns)
        if request.method == "PATCH":
            return await self._update(request, table, columns)
        if request.method == "DELETE":
            return await self._delete(request, table, columns)
        raise PostgrestError(405, "PGRST117", f"Unsupported HTTP method: {request.method}")

    async def _rpc_request(self, request: web.Request) -> web.StreamResponse:
        if request.method != "POST":
            raise PostgrestError(405, "PGRST101", "Only POST calls are supported here")
        name = request.match_info["name"]
        args = await _json_body(request)
        if not isinstance(args, dict):
            raise PostgrestError(400, "PGRST102", "Function arguments must be a JSON object")
        function = await self._function(name, set(args))
        declared = ", ".join(f"{_ident(a)} {t}" for a, t in function.args if a in args)
        call_args = ", ".join(
            f"{_ident(a)} => _a.{_ident(a)}" for a, _ in function.args if a in args
        )
        source = f"json_to_record($1::json) AS _a({declared})" if declared else "(SELECT 1) AS _a"
        call = f"{_ident(self._schema)}.{_ident(name)}({call_args})"
        if function.returns_rows:
            rows = f"(SELECT _r.* FROM {source}, LATERAL {call} AS _r)"
            return await self._read(
                request, rows, function.row_columns, [json.dumps(args)], function.read_only
            )
        if _has_filters(request):
            raise PostgrestError(400, "PGRST100", "filters apply only to functions returning rows")
        sql = f"SELECT to_json({call})::text FROM {source}"
        async with self._transaction(request, read_only=function.read_only) as conn:
            value = await conn.fetchval(sql, *([json.dumps(args)] if declared else []))
        return _json_text(value if value is not None else "null", 200)

    # -- reads --------------------------------------------------------------------------
    async def _read(
        self,
        request: web.Request,
        source: str,
        columns: Mapping[str, str],
        args: list[Any],
        read_only: bool,
    ) -> web.StreamResponse:
        params: list[Any] = list(args)
        select = _select_list(request, columns)
        where = _where(request, columns, params)
        order = _order_by(request, columns)
        offset, limit = _range(request)
        if self.max_rows is not None:
            limit = self.max_rows if limit is None else min(limit, self.max_rows)
        counting = "count=exact" in _prefer(request)
        body_sql = f"SELECT {select} FROM {source} AS _s {where} {order}"
        params.append(limit)
        params.append(offset)
        n = len(params)
        sql = (
            "SELECT coalesce(json_agg(_t), '[]')::text, count(*) "
            f"FROM ({body_sql} LIMIT ${n - 1} OFFSET ${n}) AS _t"
        )
        async with self._transaction(request, read_only=read_only) as conn:
            record = await conn.fetchrow(sql, *params)
            assert record is not None
            total = None
            if counting:
                count_sql = f"SELECT count(*) FROM {source} AS _s {where}"
                total = await conn.fetchval(count_sql, *params[:-2])
        body, returned = record[0], record[1]
        total_text = "*" if total is None else str(total)
        if total is not None and offset > total:
            raise PostgrestError(
                416,
                "PGRST103",
                "Requested range not satisfiable",
                details=f"An offset of {offset} was requested, but there are only {total} rows.",
                headers={"Content-Range": f"*/{total}"},
            )
        if returned:
            content_range = f"{offset}-{offset + returned - 1}/{total_text}"
        else:
            content_range = f"*/{total_text}"
        status = 206 if total is not None and returned < total else 200
        return _json_text(body, status, {"Content-Range": content_range})

    # -- writes -------------------------------------------------------------------------
    async def _insert(
        self, request: web.Request, table: str, columns: Mapping[str, str]
    ) -> web.StreamResponse:
        payload = await _json_body(request)
        rows = payload if isinstance(payload, list) else [payload]
        if not rows or not all(isinstance(r, dict) for r in rows):
            raise PostgrestError(400, "PGRST102", "Expected a JSON object or an array of them")
        if "on_conflict" in request.query or "resolution=" in _prefer(request):
            raise PostgrestError(400, "PGRST100", "upserts are not supported by this test server")
        if "columns" in request.query:
            names = [c.strip() for c in request.query["columns"].split(",") if c.strip()]
        else:
            names = list(dict.fromkeys(k for r in rows for k in r))
        _check_columns(names, columns, table)
        listed = ", ".join(_ident(c) for c in names)
        record_type = f"{_ident(self._schema)}.{_ident(table)}"
        modify = (
            f"INSERT INTO {record_type} ({listed}) SELECT {listed} "
            f"FROM json_populate_recordset(NULL::{record_type}, $1::json) RETURNING *"
        )
        return await self._modify(request, modify, [json.dumps(rows)], columns, 201)

    async def _update(
        self, request: web.Request, table: str, columns: Mapping[str, str]
    ) -> web.StreamResponse:
        payload = await _json_body(request)
        if not isinstance(payload, dict) or not payload:
            raise PostgrestError(400, "PGRST102", "Expected a non-empty JSON object")
        _check_columns(list(payload), columns, table)
        params: list[Any] = [json.dumps(payload)]
        where = _where(request, columns, params)
        if not where:
            raise PostgrestError(400, "21000", "UPDATE requires a WHERE clause")
        record_type = f"{_ident(self._schema)}.{_ident(table)}"
        sets = ", ".join(f"{_ident(c)} = _v.{_ident(c)}" for c in payload)
        modify = (
            f"UPDATE {record_type} AS _s SET {sets} "
            f"FROM json_populate_record(NULL::{record_type}, $1::json) AS _v "
            f"{where} RETURNING _s.*"
        )
        return await self._modify(request, modify, params, columns, 200)

    async def _delete(
        self, request: web.Request, table: str, columns: Mapping[str, str]
    ) -> web.StreamResponse:
        params: list[Any] = []
        where = _where(request, columns, params)
        if not where:
            raise PostgrestError(400, "21000", "DELETE requires a WHERE clause")
        record_type = f"{_ident(self._schema)}.{_ident(table)}"
        modify = f"DELETE FROM {record_type} AS _s {where} RETURNING _s.*"
        return await self._modify(request, modify, params, columns, 200)

    async def _modify(
        self,
        request: web.Request,
        modify: str,
        params: list[Any],
        columns: Mapping[str, str],
        status: int,
    ) -> web.StreamResponse:
        select = _select_list(request, columns)
        sql = (
            f"WITH _m AS ({modify}) "
            f"SELECT coalesce(json_agg(_t), '[]')::text, count(*) "
            f"FROM (SELECT {select} FROM _m AS _s) AS _t"
        )
        async with self._transaction(request, read_only=False) as conn:
            record = await conn.fetchrow(sql, *params)
        assert record is not None
        content_range = f"*/{record[1]}" if status == 201 else f"0-{record[1] - 1}/*"
        if "return=representation" in _prefer(request):
            return _json_text(record[0], status, {"Content-Range": content_range})
        return web.Response(status=201 if status == 201 else 204)

    # -- catalog ------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _transaction(
        self, request: web.Request, *, read_only: bool
    ) -> AsyncIterator[PoolConnectionProxy[asyncpg.Record]]:
        """One transaction as the request's role (PreQuery.hs `txVarQuery`)."""
        assert self._pool is not None, "server not started"
        auth = request[_AUTH]
        async with self._pool.acquire() as conn, conn.transaction(readonly=read_only):
            await conn.execute(
                "SELECT set_config('search_path', $1, true), set_config('role', $2, true), "
                "set_config('request.jwt.claims', $3, true), "
                "set_config('request.method', $4, true), set_config('request.path', $5, true)",
                _ident(self._schema),
                auth.role,
                json.dumps({**auth.claims, "role": auth.role}),
                request.method,
                request.path,
            )
            yield conn

    async def _table_columns(self, table: str) -> dict[str, str]:
        if table not in self._catalog.tables:
            raise PostgrestError(
                404,
                "PGRST205",
                f"Could not find the table '{self._schema}.{table}' in the schema cache",
            )
        return self._catalog.tables[table]

    async def _function(self, name: str, given: set[str]) -> _Function:
        for function in self._catalog.functions.get(name, []):
            names = [a for a, _ in function.args]
            required = set(names[: function.required])
            if given <= set(names) and required <= given:
                return function
        listed = ", ".join(sorted(given))
        raise PostgrestError(
            404,
            "PGRST202",
            f"Could not find the function {self._schema}.{name}"
            + (f"({listed})" if given else " without parameters")
            + " in the schema cache",
            details=f"Searched for the function {self._schema}.{name}"
            + (f" with parameters {listed}" if given else " without parameters")
            + ", but no matches were found in the schema cache.",
        )

    async def _load_catalog(self) -> None:
        assert self._pool is not None
        async with self._pool.acquire() as conn:
            columns = await conn.fetch(
                """
                SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod) AS type
                FROM pg_attribute a
                JOIN pg_class c ON c.oid = a.attrelid
                JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname = $1 AND c.relkind IN ('r', 'v', 'p', 'm')
                  AND a.attnum > 0 AND NOT a.attisdropped
                ORDER BY c.relname, a.attnum
                """,
                self._schema,
            )
            functions = await conn.fetch(
                """
                SELECT p.proname, p.proargnames, p.pronargs, p.pronargdefaults, p.proretset,
                       p.provolatile::text AS provolatile, t.typrelid,
                       ARRAY(SELECT format_type(x, NULL) FROM unnest(p.proargtypes) AS x)
                           AS argtypes,
                       ARRAY(SELECT a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
                             FROM pg_attribute a
                             WHERE a.attrelid = t.typrelid AND a.attnum > 0
                               AND NOT a.attisdropped ORDER BY a.attnum) AS rowcols
                FROM pg_proc p
                JOIN pg_namespace n ON n.oid = p.pronamespace
                JOIN pg_type t ON t.oid = p.prorettype
                WHERE n.nspname = $1 AND p.prokind = 'f' AND p.proargmodes IS NULL
                """,
                self._schema,
            )
        catalog = _Catalog()
        for record in columns:
            catalog.tables.setdefault(record["relname"], {})[record["attname"]] = record["type"]
        for record in functions:
            names = list(record["proargnames"] or [])
            if len(names) != record["pronargs"] or not all(names):
                continue  # unnamed arguments: not callable with a JSON object
            row_columns = {}
            for item in record["rowcols"]:
                col, _, typ = item.partition(" ")
                row_columns[col] = typ
            catalog.functions.setdefault(record["proname"], []).append(
                _Function(
                    name=record["proname"],
                    args=list(zip(names, record["argtypes"], strict=True)),
                    required=record["pronargs"] - record["pronargdefaults"],
                    returns_rows=bool(record["proretset"]) and bool(row_columns),
                    row_columns=row_columns,
                    read_only=record["provolatile"] in ("s", "i"),
                )
            )
        self._catalog = catalog


# -- request parsing ------------------------------------------------------------------


def _prefer(request: web.Request) -> str:
    return ",".join(request.headers.getall("Prefer", [])).replace(" ", "")


def _has_filters(request: web.Request) -> bool:
    return any(key not in _RESERVED for key in request.query)


async def _json_body(request: web.Request) -> Any:
    try:
        return json.loads(await request.read() or b"null")
    except ValueError as exc:
        raise PostgrestError(400, "PGRST102", f"Empty or invalid json: {exc}") from None


def _check_columns(names: list[str], columns: Mapping[str, str], table: str) -> None:
    for name in names:
        if name not in columns:
            raise PostgrestError(
                400,
                "PGRST204",
                f"Could not find the '{name}' column of '{table}' in the schema cache",
            )


def _column(name: str, columns: Mapping[str, str]) -> str:
    if name not in columns:
        raise PostgrestError(400, "42703", f"column _s.{name} does not exist")
    return _ident(name)


def _select_list(request: web.Request, columns: Mapping[str, str]) -> str:
    raw = request.query.get("select", "*").replace(" ", "")
    if raw in ("", "*"):
        return ", ".join(f"_s.{_ident(c)}" for c in columns)
    return ", ".join(f"_s.{_column(name, columns)}" for name in raw.split(","))


def _where(request: web.Request, columns: Mapping[str, str], params: list[Any]) -> str:
    clauses: list[str] = []
    for key, value in request.query.items():
        if key in _RESERVED:
            continue
        if key in ("or", "and", "not.or", "not.and"):
            raise PostgrestError(400, "PGRST100", "logical operators are not supported here")
        column = f"_s.{_column(key, columns)}"
        sql_type = columns[key]
        negate = value.startswith("not.")
        if negate:
            value = value[len("not.") :]
        op, dot, operand = value.partition(".")
        if not dot:
            raise PostgrestError(400, "PGRST100", f'"failed to parse filter ({value})"')
        if op in _COMPARISONS:
            params.append(operand)
            clause = f"{column} {_COMPARISONS[op]} CAST(${len(params)}::text AS {sql_type})"
        elif op == "is":
            if operand.lower() not in _IS_VALUES:
                raise PostgrestError(400, "PGRST100", f'"failed to parse filter (is.{operand})"')
            clause = f"{column} IS {_IS_VALUES[operand.lower()]}"
        elif op == "in":
            items = _in_list(operand)
            placeholders = []
            for item in items:
                params.append(item)
                placeholders.append(f"CAST(${len(params)}::text AS {sql_type})")
            clause = f"{column} IN ({', '.join(placeholders)})" if items else "false"
        else:
            raise PostgrestError(400, "PGRST100", f'"failed to parse filter ({op})"')
        clauses.append(f"NOT ({clause})" if negate else clause)
    return ("WHERE " + " AND ".join(clauses)) if clauses else ""


def _in_list(operand: str) -> list[str]:
    """`(a,b,"c,d")` as PostgREST reads it: double quotes protect commas, `\\` escapes."""
    if not (operand.startswith("(") and operand.endswith(")")):
        raise PostgrestError(400, "PGRST100", f'"failed to parse filter (in.{operand})"')
    items: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in operand[1:-1]:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    if current or items:
        items.append("".join(current))
    return items


def _order_by(request: web.Request, columns: Mapping[str, str]) -> str:
    raw = request.query.get("order")
    if not raw:
        return ""
    terms = []
    for term in raw.split(","):
        name, *modifiers = term.strip().split(".")
        sql = f"_s.{_column(name, columns)}"
        for modifier in modifiers:
            if modifier in ("asc", "desc"):
                sql += f" {modifier.upper()}"
            elif modifier in ("nullsfirst", "nullslast"):
                sql += " NULLS FIRST" if modifier == "nullsfirst" else " NULLS LAST"
            else:
                raise PostgrestError(400, "PGRST100", f'"failed to parse order ({term})"')
        terms.append(sql)
    return "ORDER BY " + ", ".join(terms)


def _range(request: web.Request) -> tuple[int, int | None]:
    """(offset, limit) from `offset`/`limit` (which win) or the `Range` header."""
    offset, limit = 0, None
    header = request.headers.get("Range")
    if header:
        match = _RANGE.match(header.strip())
        if match is None:
            raise PostgrestError(416, "PGRST103", "Requested range not satisfiable")
        offset = int(match.group(1))
        if match.group(2):
            limit = max(int(match.group(2)) - offset + 1, 0)
    try:
        if "offset" in request.query:
            offset = int(request.query["offset"])
        if "limit" in request.query:
            limit = int(request.query["limit"])
    except ValueError:
        raise PostgrestError(400, "PGRST100", "limit and offset must be integers") from None
    if offset < 0 or (limit is not None and limit < 0):
        raise PostgrestError(400, "PGRST100", "limit and offset must not be negative")
    return offset, limit


def _json_text(body: str, status: int, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        text=body,
        status=status,
        content_type="application/json",
        charset="utf-8",
        headers=headers,
    )


def _pg_error_response(exc: asyncpg.PostgresError, role: str) -> web.Response:
    code = exc.sqlstate or "XX000"
    headers: dict[str, str] = {}
    message = getattr(exc, "message", None) or str(exc)
    if code == "42501":
        # Error.hs mapSQLtoHTTP: "if authed then 403 else 401", authed = role /= anon role.
        status = 403 if role != ANON_ROLE else 401
    elif code == "22023" and message.startswith("role") and message.endswith("does not exist"):
        status = 401  # the JWT names a role the database lacks
    else:
        status = _STATUS_BY_SQLSTATE.get(code) or _STATUS_BY_CLASS.get(code[:2], 400)
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    body = {
        "code": code,
        "details": getattr(exc, "detail", None),
        "hint": getattr(exc, "hint", None),
        "message": message,
    }
    return web.json_response(body, status=status, headers=headers)


def _authorize(request: web.Request) -> _Auth:
    """The request's role, as Supabase's gateway and PostgREST's Auth.hs decide it."""
    apikey = request.headers.get("apikey")
    if not apikey:
        raise PostgrestError(
            401,
            "",
            "No API key found in request",
            hint="No `apikey` request header or url param was found.",
        )
    key_auth = _key_auth(apikey)
    if key_auth is None:
        raise PostgrestError(
            401,
            "",
            "Invalid API key",
            hint="Double check your Supabase `anon` or `service_role` API key.",
        )
    bearer = request.headers.get("Authorization")
    if bearer is None or bearer == f"Bearer {apikey}":
        return key_auth
    token = bearer.removeprefix("Bearer ")
    claims = _jwt_claims(token) if token != bearer else None
    if claims is None:
        raise PostgrestError(
            401,
            "PGRST301",
            "No suitable key or wrong key type",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return _Auth(role=str(claims.get("role") or ANON_ROLE), claims=claims)


def _key_auth(apikey: str) -> _Auth | None:
    if apikey in OPAQUE_KEYS:
        return _Auth(role=OPAQUE_KEYS[apikey], claims={"role": OPAQUE_KEYS[apikey]})
    claims = _jwt_claims(apikey)
    if claims is None:
        return None
    return _Auth(role=str(claims.get("role") or ANON_ROLE), claims=claims)


def _jwt_claims(token: str) -> dict[str, Any] | None:
    try:
        claims: dict[str, Any] = jwt.decode(token, JWT_SECRET, algorithms=["HS256"])
    except jwt.PyJWTError:
        return None
    return claims


def _as_authenticator(dsn: str) -> str:
    """The DSN with PostgREST's login role, `authenticator`."""
    scheme, _, rest = dsn.partition("://")
    _, at, host = rest.rpartition("@")
    return f"{scheme}://authenticator@{host if at else rest}"


@contextlib.asynccontextmanager
async def running_postgrest(
    dsn: str, *, max_rows: int | None = 1000
) -> AsyncIterator[PostgrestServer]:
    """A started server on a free port of 127.0.0.1; stopped on exit."""
    server = PostgrestServer(dsn, max_rows=max_rows)
    await server.start()
    try:
        yield server
    finally:
        await server.close()
