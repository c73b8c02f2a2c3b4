"""GET /openapi.json (OpenAPI 3.1) and GET /docs (the same document as an HTML page).

The document is generated from the route tables and the msgspec types the handlers decode
and encode with (`msgspec.json.schema_components`), never written by hand. `/docs` is
rendered on the server from that document: no scripts, no CDN (works offline).
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from importlib import metadata
from typing import Any

import msgspec
from aiohttp import web

from handlers.rest_models import Endpoint, ErrorResponse
from handlers.webhooks import ROUTES as WEBHOOK_ROUTES
from service.domain.lead import LeadOut

REF = "#/components/schemas/{name}"
OPENAPI_DOC: web.AppKey[dict[str, Any]] = web.AppKey("openapi_doc", dict)
DOCS_HTML: web.AppKey[str] = web.AppKey("docs_html", str)

ERROR_TEXT = {
    400: "Bad input: `error` names the parameter or field and what it expects",
    401: "Missing or wrong `Authorization: Bearer <API_TOKEN>`",
    404: "Not found, or it belongs to another account",
    409: "A lead for this phone exists already on the instance",
    413: "Body too large",
    503: "A dependency (database, broker) is unavailable; retry later",
}
INTRO = (
    "Scores WhatsApp leads from Evolution API conversations. Every endpoint needs "
    "`Authorization: Bearer <credential>` except `/health` and the webhooks (which use the "
    "webhook token or Evolution's JWT). Credentials: `API_TOKEN` is the platform-wide admin "
    "(any `userAccountId`); an API key from `crm-backend keys create` or a Supabase Auth "
    "access token is bound to one account, which then needs no `userAccountId` (another "
    "one gets 404). Parameter and body names are camelCase; lead rows "
    "use the table's snake_case column names. Errors: "
    '`{"success": false, "error": "...", "details": {...}}`.'
)
AUTH_DISABLED_NOTE = (
    " **AUTH_DISABLED=true on this server: the REST API accepts every request without a "
    "credential, for any account.** Webhooks still need WEBHOOK_TOKEN or Evolution's JWT "
    "when either is set, and are open only when neither is."
)

# The webhook routes belong to `handlers.webhooks` (every URL form Evolution builds); listed
# here so the document is complete.
WEBHOOK_ENDPOINTS = tuple(
    Endpoint(
        "POST",
        path,
        "Evolution API webhook",
        errors=(),
        auth=False,
        tag="webhooks",
        description="Body as Evolution sends it. Auth: `?token=`, `X-Webhook-Token` or "
        "`apikey` equal to WEBHOOK_TOKEN, or Evolution's HS256 JWT (WEBHOOK_JWT_SECRET). "
        '200 `{"ok": true, "queued": n}` once RabbitMQ confirmed; other events: 200 '
        '`{"ok": true, "ignored": "<event>"}`; 400 malformed, 401 bad auth, 413 too '
        "large, 503 broker unavailable (Evolution retries).",
        path_params=("event",) if "{event}" in path else (),
    )
    for path in WEBHOOK_ROUTES
)
DOC_ENDPOINTS = (
    Endpoint(
        "GET",
        "/openapi.json",
        "This document (OpenAPI 3.1)",
        media_type="application/json",
        errors=(401,),
        tag="operations",
    ),
    Endpoint(
        "GET",
        "/docs",
        "This document as an HTML page",
        media_type="text/html",
        errors=(401,),
        tag="operations",
    ),
)


def _version() -> str:
    try:
        return metadata.version("crm-backend")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0.0.0"


def _strip_null(schema: dict[str, Any]) -> dict[str, Any]:
    """`anyOf [X, null]` -> X: a query parameter is absent, never null."""
    options = schema.get("anyOf")
    if options and len(options) == 2 and {"type": "null"} in options:
        inner = next(o for o in options if o != {"type": "null"})
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        if rest.get("default", 0) is None:
            rest.pop("default")
        return {**inner, **rest}
    return schema


def _query_parameters(kind: type[msgspec.Struct]) -> list[dict[str, Any]]:
    _, components = msgspec.json.schema_components([kind], ref_template=REF)
    schema = components[kind.__name__]
    required = set(schema.get("required", ()))
    params = []
    for name, prop in schema["properties"].items():
        prop = _strip_null(prop)
        param: dict[str, Any] = {
            "name": name,
            "in": "query",
            "required": name in required,
            "schema": prop,
        }
        if "description" in prop:
            param["description"] = prop["description"]
        params.append(param)
    return params


def build_openapi(endpoints: Iterable[Endpoint]) -> dict[str, Any]:
    endpoints = list(endpoints)
    schema_types: list[Any] = [ErrorResponse]
    for ep in endpoints:
        schema_types += [t for t in (ep.body, ep.response) if t is not None]
    _, components = msgspec.json.schema_components(schema_types, ref_template=REF)
    # The lead's columns have defaults (a store row may be built from a few), but an
    # answer is encoded with every one of them: say so to clients.
    lead = components.get(LeadOut.__name__)
    if lead is not None:
        lead["required"] = list(LeadOut.__struct_fields__)

    paths: dict[str, dict[str, Any]] = {}
    for ep in endpoints:
        op: dict[str, Any] = {
            "summary": ep.summary,
            "operationId": _operation_id(ep),
            "tags": [ep.tag],
        }
        if ep.description:
            op["description"] = ep.description
        if not ep.auth:
            op["security"] = []
        params = [
            {"name": p, "in": "path", "required": True, "schema": _path_schema(p)}
            for p in ep.path_params
        ]
        if ep.query is not None:
            params += _query_parameters(ep.query)
        if params:
            op["parameters"] = params
        if ep.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": _ref(ep.body)}},
            }
        op["responses"] = _responses(ep)
        paths.setdefault(ep.path, {})[ep.method.lower()] = op

    return {
        "openapi": "3.1.0",
        "info": {"title": "crm-backend", "version": _version(), "description": INTRO},
        "servers": [{"url": "/"}],
        "security": [{"bearerAuth": []}],
        "tags": [
            {"name": "dialogs", "description": "Leads, statistics, export, manual edits"},
            {"name": "operations", "description": "Health, readiness, metrics, this document"},
            {"name": "webhooks", "description": "Evolution API intake"},
        ],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "description": "API_TOKEN"}
            },
        },
    }


def _ref(kind: type[msgspec.Struct]) -> dict[str, str]:
    return {"$ref": REF.format(name=kind.__name__)}


def _path_schema(name: str) -> dict[str, Any]:
    return {"type": "string"} if name == "event" else {"type": "string", "format": "uuid"}


def _operation_id(ep: Endpoint) -> str:
    words = [w.strip("{}") for w in ep.path.strip("/").replace("-", "/").split("/") if w]
    return ep.method.lower() + "".join(w[:1].upper() + w[1:] for w in words)


def _responses(ep: Endpoint) -> dict[str, Any]:
    ok: dict[str, Any] = {"description": "Success"}
    if ep.response is not None:
        ok["content"] = {ep.media_type: {"schema": _ref(ep.response)}}
    elif ep.media_type == "text/csv":
        ok["content"] = {"text/csv": {"schema": {"type": "string"}}}
        ok["headers"] = {
            "Content-Disposition": {
                "schema": {"type": "string"},
                "description": 'attachment; filename="leads-<instance>-<date>.csv"',
            }
        }
    elif ep.media_type != "application/json" or ep.tag == "operations":
        ok["content"] = {ep.media_type: {"schema": {"type": "string"}}}
    responses: dict[str, Any] = {str(ep.status): ok}
    error_schema = {"application/json": {"schema": _ref(ErrorResponse)}}
    for status in ep.errors:
        if status == 503 and ep.response is not None and ep.path == "/ready":
            # /ready answers 503 with its own body naming what is down.
            responses["503"] = {"description": ERROR_TEXT[503], "content": ok["content"]}
            continue
        responses[str(status)] = {"description": ERROR_TEXT[status], "content": error_schema}
    return responses


# -- /docs --------------------------------------------------------------------------------
def schema_text(schema: dict[str, Any]) -> str:
    """A JSON schema in a few words (for the HTML page)."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f'<a href="#schema-{_e(name)}">{_e(name)}</a>'
    if "anyOf" in schema:
        return " | ".join(schema_text(s) for s in schema["anyOf"])
    if "enum" in schema:
        return "one of " + ", ".join(f"<code>{_e(str(v))}</code>" for v in schema["enum"])
    kind = schema.get("type", "any")
    if kind == "array":
        return "list of " + schema_text(schema.get("items", {}))
    if kind == "object" and "additionalProperties" in schema:
        extra = schema["additionalProperties"]
        return "object" + (f" of {schema_text(extra)}" if isinstance(extra, dict) else "")
    words = _e(str(kind))
    if "format" in schema:
        words += f" ({_e(schema['format'])})"
    limits = []
    for key, label in (
        ("minimum", "≥"),
        ("maximum", "≤"),
        ("minLength", "length ≥"),
        ("maxLength", "length ≤"),
    ):
        if key in schema:
            limits.append(f"{label} {schema[key]}")
    if limits:
        words += ", " + ", ".join(limits)
    return words


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _md(text: str) -> str:
    """Escape, then render `code` spans (the only markup the descriptions use)."""
    parts = _e(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_docs(doc: dict[str, Any]) -> str:
    schemas: dict[str, Any] = doc["components"]["schemas"]
    out = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>{_e(doc['info']['title'])} API</title>",
        "<style>body{font:15px/1.5 system-ui,sans-serif;max-width:980px;margin:2em auto;"
        "padding:0 1em;color:#222}code{background:#f3f3f3;padding:0 .2em}"
        "table{border-collapse:collapse;margin:.5em 0 1em;width:100%}"
        "td,th{border:1px solid #ddd;padding:.25em .5em;text-align:left;vertical-align:top}"
        "h2{border-top:2px solid #eee;padding-top:.8em}.m{font-weight:bold;color:#06c}"
        "</style></head><body>",
        f"<h1>{_e(doc['info']['title'])} API <small>{_e(doc['info']['version'])}</small></h1>",
        f"<p>{_md(doc['info']['description'])}</p>",
        '<p>Machine-readable: <a href="/openapi.json">/openapi.json</a> (OpenAPI 3.1).</p>',
        "<h2>Endpoints</h2><ul>",
    ]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            anchor = _e(op["operationId"])
            out.append(
                f'<li><a href="#{anchor}"><span class=m>{method.upper()}</span> '
                f"{_e(path)}</a> — {_e(op['summary'])}</li>"
            )
    out.append("</ul>")
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            out.append(_render_operation(path, method, op, schemas))
    out.append("<h2>Schemas</h2>")
    for name, schema in schemas.items():
        out.append(_render_schema(name, schema))
    out.append("</body></html>")
    return "\n".join(out)


def _render_operation(path: str, method: str, op: dict[str, Any], schemas: dict[str, Any]) -> str:
    auth = "no token" if op.get("security") == [] else "bearer token"
    parts = [
        f'<h3 id="{_e(op["operationId"])}"><span class=m>{method.upper()}</span> '
        f"<code>{_e(path)}</code></h3>",
        f"<p><b>{_e(op['summary'])}</b> ({auth}). {_md(op.get('description', ''))}</p>",
    ]
    if op.get("parameters"):
        parts.append("<table><tr><th>parameter</th><th>in</th><th>type</th><th>required</th></tr>")
        for p in op["parameters"]:
            desc = p.get("description") or p["schema"].get("description", "")
            default = p["schema"].get("default")
            extra = f" — {_e(desc)}" if desc else ""
            extra += f" (default <code>{_e(str(default))}</code>)" if default is not None else ""
            parts.append(
                f"<tr><td><code>{_e(p['name'])}</code></td><td>{_e(p['in'])}</td>"
                f"<td>{schema_text(p['schema'])}{extra}</td>"
                f"<td>{'yes' if p.get('required') else 'no'}</td></tr>"
            )
        parts.append("</table>")
    if "requestBody" in op:
        ref = op["requestBody"]["content"]["application/json"]["schema"]
        parts.append(f"<p>JSON body: {schema_text(ref)}</p>")
    parts.append("<p>Responses:</p><ul>")
    for status, response in op["responses"].items():
        shapes = [
            f"<code>{_e(media)}</code> {schema_text(body.get('schema', {}))}"
            for media, body in response.get("content", {}).items()
        ]
        parts.append(
            f"<li><b>{_e(status)}</b> {_md(response['description'])}"
            + (" — " + ", ".join(shapes) if shapes else "")
            + "</li>"
        )
    parts.append("</ul>")
    return "\n".join(parts)


def _render_schema(name: str, schema: dict[str, Any]) -> str:
    parts = [f'<h3 id="schema-{_e(name)}">{_e(name)}</h3>']
    if "description" in schema:
        parts.append(f"<p>{_md(schema['description'])}</p>")
    props: dict[str, Any] = schema.get("properties", {})
    if props:
        required = set(schema.get("required", ()))
        parts.append("<table><tr><th>field</th><th>type</th><th>required</th></tr>")
        for field, prop in props.items():
            desc = prop.get("description", "")
            parts.append(
                f"<tr><td><code>{_e(field)}</code></td><td>{schema_text(prop)}"
                f"{' — ' + _e(desc) if desc else ''}</td>"
                f"<td>{'yes' if field in required else 'no'}</td></tr>"
            )
        parts.append("</table>")
        if schema.get("additionalProperties") is False:
            parts.append("<p>Other fields are refused (400).</p>")
    return "\n".join(parts)


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI_DOC])


async def docs(request: web.Request) -> web.Response:
    return web.Response(text=request.app[DOCS_HTML], content_type="text/html")


def setup(
    app: web.Application, endpoints: Iterable[Endpoint], *, auth_disabled: bool = False
) -> None:
    """Register /openapi.json and /docs for `endpoints` (plus these two and the webhooks)."""
    doc = build_openapi([*endpoints, *WEBHOOK_ENDPOINTS, *DOC_ENDPOINTS])
    if auth_disabled:
        doc["info"]["description"] += AUTH_DISABLED_NOTE
    app[OPENAPI_DOC] = doc
    app[DOCS_HTML] = render_docs(doc)
    app.router.add_get("/openapi.json", openapi_json, allow_head=False)
    app.router.add_get("/docs", docs, allow_head=False)
