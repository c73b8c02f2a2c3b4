"""REST `/dialogs/...`: the original service's paths, parameters and response shapes.

Handlers only translate HTTP into calls of the results store, the manual-edit rules
(`service.usecases.lead_edits`) and the backfill runner; every read and write is scoped to the
account given. Routes and `/openapi.json` are both built from `ROUTES`.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

from aiohttp import web
from loguru import logger

from handlers.app_context import CTX, context
from handlers.http_errors import ApiError, decode_body, json_response, parse_query, path_uuid
from handlers.principal import principal_ref
from handlers.rest_models import (
    AccountParams,
    AnalysisListParams,
    AnalysisListResponse,
    AnalyzeBody,
    AnalyzeResponse,
    DeleteResponse,
    Endpoint,
    ExportParams,
    FunnelParams,
    FunnelResponse,
    HistoryParams,
    HistoryResponse,
    LeadCreateBody,
    LeadPatchBody,
    LeadResponse,
    StatsParams,
    StatsResponse,
)
from service.adapters.stores.base import DuplicateLeadError, ResultsStore
from service.domain.history import FUNNEL_ORDER, manual_cause
from service.domain.lead import LeadRow, lead_out
from service.usecases.backfill import BackfillOptions, run_backfill
from service.usecases.csv_export import csv_chunks
from service.usecases.lead_edits import (
    PHONE_MAX_DIGITS,
    PHONE_MIN_DIGITS,
    new_manual_lead,
    normalized_phone,
    patch_update,
)

RouteHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
EXPORTS: web.AppKey[asyncio.Semaphore] = web.AppKey("csv_exports", asyncio.Semaphore)
EXPORT_CHUNK_ROWS = 500
_FILENAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _store(request: web.Request) -> ResultsStore:
    return context(request).store


async def _require_instance(store: ResultsStore, instance: str, account: uuid.UUID) -> None:
    """404 unless `instance` is mapped to `account` (another account's looks absent too)."""
    if await store.instance_account(instance) != account:
        raise ApiError(
            404,
            f"instance {instance} not found for this account",
            {"field": "instanceName"},
        )


async def list_analysis(request: web.Request) -> web.Response:
    params = parse_query(request, AnalysisListParams)
    rows, count = await _store(request).query_leads(params.lead_query())
    return json_response(
        AnalysisListResponse(success=True, results=[lead_out(r) for r in rows], count=count)
    )


async def stats(request: web.Request) -> web.Response:
    params = parse_query(request, StatsParams)
    result = await _store(request).stats(params.user_account_id, params.instance_name)
    return json_response(StatsResponse(success=True, stats=result))


async def export_csv(request: web.Request) -> web.StreamResponse:
    params = parse_query(request, ExportParams)
    exports = request.app[EXPORTS]
    if exports.locked():
        raise ApiError(503, "too many CSV exports running (EXPORT_MAX_CONCURRENT), retry later")
    async with exports:
        return await _export(request, params)


async def _export(request: web.Request, params: ExportParams) -> web.StreamResponse:
    send_timeout = context(request).settings.export_send_timeout
    rows = _store(request).iter_leads(params.to_query(), chunk_size=1000).__aiter__()
    # The first row is fetched before the response starts, so an unreachable store is
    # still a 503 and not a truncated file.
    try:
        first: LeadRow | None = await rows.__anext__()
    except StopAsyncIteration:
        first = None

    response = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": f'attachment; filename="{_filename(params.instance_name)}"',
            "Cache-Control": "no-store",
        }
    )
    await response.prepare(request)
    written = 0
    try:
        async for chunk in csv_chunks(_chain(first, rows), EXPORT_CHUNK_ROWS):
            # A client that stops reading holds the chunk in our buffers: bounded wait.
            async with asyncio.timeout(send_timeout):
                await response.write(chunk)
            written += 1
    except ConnectionResetError:
        logger.info("CSV export stopped: the client went away after {} chunks", written)
        return response
    except TimeoutError:
        logger.info("CSV export stopped: the client read nothing for {:g} s", send_timeout)
        if request.transport is not None:
            request.transport.abort()  # close() would wait for the unread buffer
        return response
    except Exception as exc:
        # Headers are sent: no error status is possible any more. Dropping the connection
        # before the final chunk makes the client see a failed download, not a short file.
        logger.warning(
            "CSV export failed after {} chunks: {}: {}", written, type(exc).__name__, exc
        )
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write_eof()
    logger.debug("CSV export sent in {} chunks", written)
    return response


async def _chain(first: LeadRow | None, rest: AsyncIterator[LeadRow]) -> AsyncIterator[LeadRow]:
    if first is None:
        return
    yield first
    async for row in rest:
        yield row


def _filename(instance: str | None) -> str:
    name = _FILENAME_UNSAFE.sub("_", instance or "all").strip("._") or "instance"
    return f"leads-{name[:60]}-{datetime.now(UTC):%Y%m%d}.csv"


async def create_lead(request: web.Request) -> web.Response:
    body = await decode_body(request, LeadCreateBody)
    phone = normalized_phone(body.phone)
    if phone is None:
        expected = f"a phone number with {PHONE_MIN_DIGITS} to {PHONE_MAX_DIGITS} digits"
        raise ApiError(400, f"field phone must be {expected}", {"field": "phone"})
    store = _store(request)
    await _require_instance(store, body.instance_name, body.user_account_id)
    row = new_manual_lead(body.new_lead(phone), datetime.now(UTC))
    try:
        created = await store.create_lead(row, manual_cause(principal_ref(request)))
    except DuplicateLeadError:
        raise ApiError(
            409,
            f"a lead for this phone exists already on instance {body.instance_name}",
            {"field": "phone"},
        ) from None
    logger.info("lead {} created by hand", created.id, instance=body.instance_name)
    return json_response(LeadResponse(success=True, lead=lead_out(created)), status=201)


async def patch_lead(request: web.Request) -> web.Response:
    lead_id = path_uuid(request)
    body = await decode_body(request, LeadPatchBody)
    changes = body.changes()
    if not changes:
        raise ApiError(400, "nothing to change: give at least one field besides userAccountId")
    store = _store(request)
    row = await store.get_lead(body.user_account_id, lead_id)
    if row is None:
        raise ApiError(404, "lead not found for this account", {"field": "id"})
    updated = await store.update_lead(
        body.user_account_id,
        lead_id,
        changes,
        derived=patch_update(row, changes),
        cause=manual_cause(principal_ref(request)),
    )
    if updated is None:  # deleted in between
        raise ApiError(404, "lead not found for this account", {"field": "id"})
    logger.info("lead {} edited: {}", lead_id, ", ".join(sorted(changes)))
    return json_response(LeadResponse(success=True, lead=lead_out(updated)))


async def lead_history(request: web.Request) -> web.Response:
    lead_id = path_uuid(request)
    params = parse_query(request, HistoryParams)
    page = await _store(request).lead_history(
        params.user_account_id, lead_id, params.limit, params.offset
    )
    if page is None:
        raise ApiError(404, "lead not found for this account", {"field": "id"})
    return json_response(HistoryResponse(success=True, history=page.history, count=page.count))


async def funnel(request: web.Request) -> web.Response:
    params = parse_query(request, FunnelParams)
    since = _utc(params.since)
    until = _utc(params.until) if params.until is not None else datetime.now(UTC)
    if since >= until:
        raise ApiError(400, "since must be before until", {"field": "since"})
    report = await _store(request).funnel(
        params.user_account_id, since, until, params.instance_name, FUNNEL_ORDER
    )
    ordered = {stage: report[stage] for stage in FUNNEL_ORDER if stage in report}
    return json_response(FunnelResponse(success=True, funnel=ordered))


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


async def delete_analysis(request: web.Request) -> web.Response:
    lead_id = path_uuid(request)
    params = parse_query(request, AccountParams)
    if not await _store(request).delete_lead(params.user_account_id, lead_id):
        raise ApiError(404, "lead not found for this account", {"field": "id"})
    logger.info("lead {} deleted", lead_id)
    return json_response(DeleteResponse(success=True, id=lead_id))


async def analyze(request: web.Request) -> web.Response:
    body = await decode_body(request, AnalyzeBody)
    ctx = context(request)
    await _require_instance(ctx.store, body.instance_name, body.user_account_id)
    options = BackfillOptions(
        instance=body.instance_name,
        account=body.user_account_id,
        min_incoming=body.min_incoming,
        max_contacts=body.max_contacts,
        max_dialogs=body.max_dialogs,
        concurrency=ctx.settings.analysis_concurrency,
    )
    result = await run_backfill(ctx.pipeline, ctx.reader, options)
    logger.info(
        "analysis of an instance done: {} contacts, {} analysed, {} errors",
        result.total,
        result.analyzed,
        result.errors,
        instance=body.instance_name,
    )
    return json_response(AnalyzeResponse(success=True, stats=result.counts()))


ROUTES: tuple[tuple[Endpoint, RouteHandler], ...] = (
    (
        Endpoint(
            "POST",
            "/dialogs/analyze",
            "Analyse an instance's dialogs now",
            body=AnalyzeBody,
            response=AnalyzeResponse,
            errors=(400, 401, 404, 503),
            description="Runs the analysis pipeline over the instance's contacts with the "
            "body's limits (contacts unchanged since their stored analysis are skipped) and "
            "answers when done. The instance must belong to the account, else 404.",
        ),
        analyze,
    ),
    (
        Endpoint(
            "GET",
            "/dialogs/analysis",
            "List leads",
            query=AnalysisListParams,
            response=AnalysisListResponse,
            description="Sorted by score, then last message (newest first). `count` is the "
            "number of all matching rows; page with `limit` and `offset`.",
        ),
        list_analysis,
    ),
    (
        Endpoint(
            "GET",
            "/dialogs/stats",
            "Lead statistics of an account",
            query=StatsParams,
            response=StatsResponse,
        ),
        stats,
    ),
    (
        Endpoint(
            "GET",
            "/dialogs/export-csv",
            "Export leads as CSV",
            query=ExportParams,
            media_type="text/csv",
            description="UTF-8 with BOM, streamed; every list filter applies. The original's "
            "17 columns first, then niche, score_breakdown, score_evidence (the first "
            "quote behind each score line) and more. Cells starting with "
            "= + - @, tab or CR (also behind blanks or invisible characters, and in "
            "full-width forms) are prefixed with ' (formula injection). No match: header "
            "only. 503 while EXPORT_MAX_CONCURRENT exports run.",
        ),
        export_csv,
    ),
    (
        Endpoint(
            "POST",
            "/dialogs/leads",
            "Create a lead by hand",
            body=LeadCreateBody,
            response=LeadResponse,
            status=201,
            errors=(400, 401, 404, 409),
            description="`source` is manual; the score is computed from the given facts; "
            "given fields join `manual_fields` (automatic analyses keep them). 409 when the "
            "instance has a lead for this phone; 404 unless the instance is the account's.",
        ),
        create_lead,
    ),
    (
        Endpoint(
            "PATCH",
            "/dialogs/leads/{id}",
            "Edit a lead by hand",
            body=LeadPatchBody,
            response=LeadResponse,
            errors=(400, 401, 404),
            path_params=("id",),
            description="Only given fields change (null clears one); they join "
            "`manual_fields`, so later automatic analyses keep them. Score and interest "
            "are recomputed from the facts unless given (or set by hand before).",
        ),
        patch_lead,
    ),
    (
        Endpoint(
            "GET",
            "/dialogs/leads/{id}/history",
            "A lead's history",
            query=HistoryParams,
            response=HistoryResponse,
            errors=(400, 401, 404),
            path_params=("id",),
            description="Every change of the lead's funnel_stage, score and interest_level, "
            "newest first: when, from → to, and the cause (`analysis` with its analyzer and "
            "model, `manual` with the credential's public reference, `delete`: the "
            "re-analysis after messages were deleted in WhatsApp). Kept across "
            "re-analyses, deleted with the lead. Page with `limit` and `offset`; `count` "
            "is every entry. Another account's lead: 404.",
        ),
        lead_history,
    ),
    (
        Endpoint(
            "GET",
            "/dialogs/funnel",
            "Funnel report of a period",
            query=FunnelParams,
            response=FunnelResponse,
            description="Computed in SQL from the stage history. Per stage: `entered`, the "
            "leads whose stage became it in [since, until) (a lead's first stage counts as "
            "entering it; each lead once per stage); `moved_to`, how many of those reached "
            "each later stage before `until` (the order: new_lead, not_qualified, "
            "qualified, consultation_booked, consultation_completed, deal_closed, "
            "deal_lost); `median_hours_to`, the median hours from entering the stage to "
            "reaching that one (only stages some lead reached).",
        ),
        funnel,
    ),
    (
        Endpoint(
            "DELETE",
            "/dialogs/analysis/{id}",
            "Delete a lead",
            query=AccountParams,
            response=DeleteResponse,
            errors=(400, 401, 404),
            path_params=("id",),
        ),
        delete_analysis,
    ),
)


def setup(app: web.Application) -> None:
    app[EXPORTS] = asyncio.Semaphore(app[CTX].settings.export_max_concurrent)
    for endpoint, handler in ROUTES:
        app.router.add_route(endpoint.method, endpoint.path, handler)
