"""Results store through Supabase's REST API (PostgREST), with supabase-py's async client.

Every operation is one PostgREST request: table reads with filters, order and ranges,
inserts and deletes, and `rpc` calls of the SQL functions of migrations/ for the write
rules, list pages and stats (the same functions the Postgres store runs).

supabase-py would wait 120 s per request and retry only GET/HEAD; here one httpx client
with a bounded timeout carries every request, and a request is retried, with a short
exponential backoff, when it failed transiently: the connection could not be made, the
server or its gateway answered 5xx/429, or PostgreSQL reported a connection, resource or
serialization error. A request that may already have taken effect (the answer was lost)
is retried only when repeating it is harmless (reads, the upsert and update functions).
Supabase caps each answer at its `max-rows` (1,000 by default): lists are fetched page
by page until the count the server reported is reached, so nothing is cut silently.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import httpx
import msgspec
from loguru import logger
from postgrest.types import CountMethod, ReturnMethod
from supabase import AsyncClientOptions, acreate_client

from service.adapters.stores.base import (
    STATE_COLUMNS,
    AnalysisWrite,
    ApiKey,
    DuplicateLeadError,
    InstanceMapping,
    InstanceMove,
    LeadQuery,
    LeadStats,
    OutboxEvent,
    StoreAccessError,
    StoredState,
    StoreUnavailableError,
    UpsertResult,
    cause_json,
    check_changes,
    creation_values,
    lead_columns,
    lead_from_record,
    state_from_record,
)
from service.adapters.stores.postgres import checked_mapping
from service.domain.history import Cause, FunnelRow, HistoryPage
from service.domain.lead import LeadRow
from service.domain.webhooks import Claim, WebhookEndpoint

T = TypeVar("T")

LEADS = "dialog_analysis"
INSTANCES = "whatsapp_instances"
# Rows asked for per request; a server with a lower max-rows answers fewer, which the
# paging loops tolerate.
PAGE_SIZE = 1000
# PostgreSQL SQLSTATE classes that mean "try again": connection (08), resources (53),
# operator intervention (57: shutdown, statement timeout), transaction rollback (40).
_TRANSIENT_SQLSTATE = ("08", "53", "57", "40")
# PostgREST's own connection and pool errors.
_TRANSIENT_PGRST = frozenset({"PGRST000", "PGRST001", "PGRST002", "PGRST003"})
# Answers from Supabase's gateway or its CDN while the API is restarting or overloaded.
_TRANSIENT_STATUS = frozenset({429, 502, 503, 504, 520, 521, 522, 523, 524})
_MISSING_OBJECT = frozenset({"42P01", "42883", "PGRST202", "PGRST205"})
KEY_VARIABLE = "SUPABASE_SERVICE_KEY"
SERVICE_ROLE = "service_role"
_SET_THE_SERVICE_KEY = (
    f"set {KEY_VARIABLE} to the project's secret key (sb_secret_…) or its legacy "
    "service_role key (Project Settings → API Keys)"
)
_REMIGRATE = "re-run the SQL of `crm-backend migrate --print` in Supabase's SQL editor"


def key_role(key: str) -> str | None:
    """The Postgres role a Supabase key stands for, when its form tells.

    New keys say it in their prefix (`sb_secret_…`: service_role, `sb_publishable_…`:
    anon); legacy keys are JWTs naming it in their `role` claim. None: an unknown form
    (what the server makes of it shows in the access check).
    """
    if key.startswith("sb_secret_"):
        return SERVICE_ROLE
    if key.startswith("sb_publishable_"):
        return "anon"
    parts = key.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    role = payload.get("role") if isinstance(payload, dict) else None
    return role if isinstance(role, str) else None


def check_key(key: str) -> None:
    """Refuse a key that is surely not the service key (StoreAccessError, one line)."""
    role = key_role(key)
    if role is None or role == SERVICE_ROLE:
        return
    if key.startswith("sb_publishable_"):
        what = "the project's publishable key (sb_publishable_…)"
    else:
        what = f"a key of role {role!r}"
    raise StoreAccessError(
        f"{KEY_VARIABLE} is {what}: Supabase would run every request as {role!r}, which "
        f"may read and write none of the leads; {_SET_THE_SERVICE_KEY}"
    )


class SupabaseHttpError(Exception):
    """A non-2xx answer from the REST API, with what PostgREST said about it."""

    def __init__(self, status: int, code: str | None, message: str, total: int | None) -> None:
        super().__init__(f"HTTP {status} {code or ''}: {message}".strip())
        self.status = status
        self.code = code
        self.message = message
        self.total = total  # from Content-Range "*/N" (a 416 answer still tells the count)

    @property
    def transient(self) -> bool:
        code = self.code or ""
        return (
            self.status in _TRANSIENT_STATUS
            or code in _TRANSIENT_PGRST
            or (len(code) == 5 and code.startswith(_TRANSIENT_SQLSTATE))
        )

    @property
    def may_have_run(self) -> bool:
        """False when PostgREST answered the error itself: its transaction rolled back."""
        return self.code is None and self.status >= 500


class _OffsetPastEnd(Exception):
    """416 from PostgREST: the offset lies past the last row (`total` rows match)."""

    def __init__(self, total: int) -> None:
        super().__init__(f"offset past the end of {total} rows")
        self.total = total


async def _raise_for_status(response: httpx.Response) -> None:
    """httpx response hook: turn every error answer into one SupabaseHttpError.

    Done here rather than from supabase-py's APIError, which drops the HTTP status (and
    with it the difference between "retry" and "fix the request").
    """
    if response.status_code < 400:
        return
    await response.aread()
    code: str | None = None
    message = response.reason_phrase or f"HTTP {response.status_code}"
    try:
        body = json.loads(response.content)
    except ValueError:
        body = None
    if isinstance(body, dict):
        code = body.get("code") if isinstance(body.get("code"), str) else None
        message = str(body.get("message") or message)
    total: int | None = None
    _, _, count = response.headers.get("content-range", "").partition("/")
    if count.isdigit():
        total = int(count)
    raise SupabaseHttpError(response.status_code, code, message, total)


class SupabaseStore:
    """ResultsStore over Supabase REST. Open with `await SupabaseStore.open(url, key)`."""

    def __init__(
        self,
        client: Any,
        http: httpx.AsyncClient,
        *,
        url: str,
        key: str,
        attempts: int = 4,
        backoff: float = 0.25,
    ) -> None:
        self._client = client
        self._http = http
        self._url = url
        self._key = key
        self._attempts = max(attempts, 1)
        self._backoff = backoff

    @classmethod
    async def open(
        cls,
        url: str,
        key: str,
        *,
        request_timeout: float = 15.0,
        attempts: int = 4,
        backoff: float = 0.25,
    ) -> SupabaseStore:
        http = httpx.AsyncClient(
            timeout=httpx.Timeout(request_timeout, connect=min(request_timeout, 5.0)),
            follow_redirects=True,
            event_hooks={"response": [_raise_for_status]},
        )
        options = AsyncClientOptions(
            httpx_client=http,
            postgrest_client_retry=False,  # retried here, uniformly and bounded
            auto_refresh_token=False,
            persist_session=False,
        )
        try:
            client = await acreate_client(url, key, options=options)
        except Exception as exc:  # supabase-py validates URL and key here
            await http.aclose()
            raise StoreUnavailableError(
                f"cannot use SUPABASE_URL/SUPABASE_SERVICE_KEY: {exc}"
            ) from None
        return cls(client, http, url=url, key=key, attempts=attempts, backoff=backoff)

    async def close(self) -> None:
        await self._http.aclose()

    async def ping(self) -> None:
        """Readiness: the key can do the store's work (see `check_access`)."""
        await self.check_access()

    async def check_access(self) -> None:
        """Check that the key may do what the store does, changing nothing.

        The key's form first (an anon or publishable key fails at once), then one request
        per kind of work: read both tables, and writes that match no row or are refused
        after the privilege check (an UPDATE and a DELETE of no row, an INSERT of a row
        that breaks NOT NULL, the upsert function without a row). Raises StoreAccessError
        naming what to fix, StoreUnavailableError when Supabase cannot be reached.
        """
        check_key(self._key)
        doing = "checking the key's access"
        leads, instances = self._leads, self._instances
        minimal = ReturnMethod.minimal
        probes: list[Callable[[], Awaitable[Any]]] = [
            lambda: leads().select("id").limit(1).execute(),
            lambda: instances().select("instance_name").limit(1).execute(),
            lambda: leads().update({"notes": None}).is_("id", "null").execute(),
            lambda: instances().delete().is_("instance_name", "null").execute(),
            lambda: leads().insert({"contact_phone": None}, returning=minimal).execute(),
            lambda: self._client.rpc("crm_upsert_analysis", {"p": {}}).execute(),
        ]

        async def probe(send: Callable[[], Awaitable[Any]]) -> None:
            try:
                await self._run(doing, send)
            except ValueError:
                pass  # refused after the privilege check (NOT NULL, missing fields)

        await asyncio.gather(*(probe(send) for send in probes))

    # -- pipeline ---------------------------------------------------------------------
    async def get_state(self, account: uuid.UUID, instance: str, phone: str) -> StoredState | None:
        response = await self._run(
            "reading a lead",
            lambda: (
                self._leads()
                .select(*STATE_COLUMNS)
                .eq("user_account_id", str(account))
                .eq("instance_name", instance)
                .eq("contact_phone", phone)
                .limit(1)
                .execute()
            ),
        )
        return state_from_record(response.data[0]) if response.data else None

    async def upsert_analysis(self, write: AnalysisWrite) -> UpsertResult:
        params = {"p": msgspec.to_builtins(write)}
        response = await self._run(
            "storing an analysis",
            lambda: self._client.rpc("crm_upsert_analysis", params).execute(),
        )
        return msgspec.convert(response.data, UpsertResult)

    async def get_states(
        self, account: uuid.UUID, instance: str, phones: Sequence[str]
    ) -> dict[str, StoredState]:
        if not phones:
            return {}
        response = await self._run(
            "reading leads",
            lambda: (
                self._leads()
                .select("contact_phone", *STATE_COLUMNS)
                .eq("user_account_id", str(account))
                .eq("instance_name", instance)
                .in_("contact_phone", list(phones))
                .execute()
            ),
        )
        return {r["contact_phone"]: state_from_record(r) for r in response.data or ()}

    async def upsert_analyses(self, writes: Sequence[AnalysisWrite]) -> list[UpsertResult]:
        # One RPC per write (each its own transaction), sent together.
        return list(await asyncio.gather(*(self.upsert_analysis(w) for w in writes)))

    # -- REST -------------------------------------------------------------------------
    async def get_lead(
        self, account: uuid.UUID, lead_id: uuid.UUID, *, include_messages: bool = False
    ) -> LeadRow | None:
        response = await self._run(
            "reading a lead",
            lambda: (
                self._leads()
                .select(*lead_columns(include_messages))
                .eq("id", str(lead_id))
                .eq("user_account_id", str(account))
                .limit(1)
                .execute()
            ),
        )
        return lead_from_record(response.data[0]) if response.data else None

    async def query_leads(self, query: LeadQuery) -> tuple[list[LeadRow], int]:
        columns = lead_columns(query.include_messages)
        offset, limit = max(query.offset, 0), max(query.limit, 0)
        rows: list[dict[str, Any]] = []
        total: int | None = None
        while True:
            start, size, counting = (
                offset + len(rows),
                min(limit - len(rows), PAGE_SIZE),
                total is None,
            )

            def request(start: int = start, size: int = size, counting: bool = counting) -> Any:
                builder = self._leads().select(
                    *columns, count=CountMethod.exact if counting else None
                )
                builder = _ordered(_filtered(builder, query))
                return builder.range(start, start + size - 1).execute()

            try:
                response = await self._run("listing leads", request)
            except _OffsetPastEnd as exc:
                return [lead_from_record(r) for r in rows], exc.total if total is None else total
            if total is None:
                total = int(response.count or 0)
            rows.extend(response.data)
            if not response.data or len(rows) >= limit or offset + len(rows) >= total:
                break
        return [lead_from_record(r) for r in rows], total

    async def iter_leads(self, query: LeadQuery, chunk_size: int = 1000) -> AsyncIterator[LeadRow]:
        """Keyset pagination through `crm_leads_page` (no OFFSET: each page is cheap)."""
        columns = lead_columns(query.include_messages)
        params: dict[str, Any] = {
            "p_account": str(query.user_account_id),
            "p_instance": query.instance_name,
            "p_interest": query.interest_level,
            "p_min_score": query.min_score,
            "p_stage": query.funnel_stage,
            "p_qualified": query.qualification_complete,
            "p_after_score": None,
            "p_after_last": None,
            "p_after_id": None,
            "p_limit": max(chunk_size, 1),
        }

        def request() -> Any:
            return self._client.rpc("crm_leads_page", params).select(*columns).execute()

        while True:
            response = await self._run("listing leads", request)
            records: list[dict[str, Any]] = response.data or []
            if not records:
                return
            for record in records:
                yield lead_from_record(record)
            last = records[-1]
            params["p_after_score"] = last["score"]
            params["p_after_last"] = last["last_message"]
            params["p_after_id"] = last["id"]

    async def stats(self, account: uuid.UUID, instance: str | None) -> LeadStats:
        params = {"p_account": str(account), "p_instance": instance}
        response = await self._run(
            "computing stats", lambda: self._client.rpc("crm_lead_stats", params).execute()
        )
        return msgspec.convert(response.data, LeadStats)

    async def create_lead(self, row: LeadRow, cause: Cause | None = None) -> LeadRow:
        params = {"p_row": creation_values(row), "p_cause": cause_json(cause)}
        response = await self._run(
            "creating a lead",
            lambda: (
                self._client.rpc("crm_create_lead", params).select(*lead_columns(False)).execute()
            ),
            repeatable=False,
        )
        return lead_from_record(response.data[0])

    async def update_lead(
        self,
        account: uuid.UUID,
        lead_id: uuid.UUID,
        changes: dict[str, Any],
        derived: dict[str, Any] | None = None,
        cause: Cause | None = None,
    ) -> LeadRow | None:
        check_changes(changes, derived)
        params = {
            "p_account": str(account),
            "p_id": str(lead_id),
            "p_changes": msgspec.to_builtins(changes),
            "p_derived": msgspec.to_builtins(derived or {}),
            "p_cause": cause_json(cause),
        }
        # Repeatable: a repeat finds the values set already, so it records no change.
        response = await self._run(
            "updating a lead",
            lambda: (
                self._client.rpc("crm_update_lead", params).select(*lead_columns(False)).execute()
            ),
        )
        return lead_from_record(response.data[0]) if response.data else None

    async def lead_history(
        self, account: uuid.UUID, lead_id: uuid.UUID, limit: int, offset: int
    ) -> HistoryPage | None:
        params = {"p_account": str(account), "p_id": str(lead_id), "p_limit": limit}
        params["p_offset"] = offset
        data = await self._call("reading a lead's history", "crm_lead_history_page", params)
        return None if data is None else msgspec.convert(data, HistoryPage)

    async def funnel(
        self,
        account: uuid.UUID,
        since: datetime,
        until: datetime,
        instance: str | None,
        stages: Sequence[str],
    ) -> dict[str, FunnelRow]:
        params = {
            "p_account": str(account),
            "p_since": since.isoformat(),
            "p_until": until.isoformat(),
            "p_instance": instance,
            "p_stages": list(stages),
        }
        data = await self._call("computing the funnel", "crm_funnel", params)
        return msgspec.convert(data or {}, dict[str, FunnelRow])

    async def claim_outbox(self, limit: int, lease_seconds: float) -> list[OutboxEvent]:
        params = {"p_limit": limit, "p_lease_seconds": lease_seconds}
        # Repeatable: a claim whose answer was lost leaves its rows to the lease's end.
        data = await self._call("claiming events", "crm_outbox_claim", params)
        return msgspec.convert(data or [], list[OutboxEvent])

    async def outbox_published(self, ids: Sequence[uuid.UUID]) -> int:
        params = {"p_ids": [str(i) for i in ids]}
        return int(await self._call("marking events published", "crm_outbox_done", params))

    async def release_outbox(self, ids: Sequence[uuid.UUID]) -> int:
        params = {"p_ids": [str(i) for i in ids]}
        return int(await self._call("releasing events", "crm_outbox_release", params))

    async def outbox_depth(self) -> int:
        return int(await self._call("counting events", "crm_outbox_depth", {}))

    async def delete_lead(self, account: uuid.UUID, lead_id: uuid.UUID) -> bool:
        response = await self._run(
            "deleting a lead",
            lambda: (
                self._leads()
                .delete()
                .eq("id", str(lead_id))
                .eq("user_account_id", str(account))
                .select("id")
                .execute()
            ),
            repeatable=False,
        )
        return bool(response.data)

    # -- instances --------------------------------------------------------------------
    async def instance_account(self, instance: str) -> uuid.UUID | None:
        response = await self._run(
            "reading an instance",
            lambda: (
                self._client.table(INSTANCES)
                .select("user_account_id")
                .eq("instance_name", instance)
                .limit(1)
                .execute()
            ),
        )
        return uuid.UUID(response.data[0]["user_account_id"]) if response.data else None

    async def add_instance(self, instance: str, account: uuid.UUID) -> InstanceMapping:
        params = {"p_instance": instance, "p_account": str(account)}
        response = await self._run(
            "mapping an instance",
            lambda: self._client.rpc("crm_add_instance", params).execute(),
        )
        return checked_mapping(response.data, instance, account)

    async def list_instances(self) -> list[InstanceMapping]:
        found: list[InstanceMapping] = []
        while True:

            def request(start: int = len(found)) -> Any:
                return (
                    self._client.table(INSTANCES)
                    .select("instance_name", "user_account_id", "created_at")
                    .order("instance_name")
                    .range(start, start + PAGE_SIZE - 1)
                    .execute()
                )

            response = await self._run("listing instances", request)
            found.extend(msgspec.convert(r, InstanceMapping) for r in response.data)
            if not response.data:
                return found

    async def move_instance(self, instance: str, account: uuid.UUID) -> InstanceMove:
        data = await self._call(
            "moving an instance",
            "crm_move_instance",
            {"p_instance": instance, "p_account": str(account)},
        )
        return msgspec.convert(data, InstanceMove)

    async def foreign_leads(self, instance: str, account: uuid.UUID) -> int:
        data = await self._call(
            "counting an instance's leads",
            "crm_foreign_leads",
            {"p_instance": instance, "p_account": str(account)},
        )
        return int(data)

    async def forget_dialog_time(self, account: uuid.UUID, instance: str, phone: str) -> bool:
        params = {"p_account": str(account), "p_instance": instance, "p_phone": phone}
        return bool(await self._call("resetting a lead", "crm_forget_dialog_time", params))

    async def record_deletes(
        self, account: uuid.UUID, instance: str, remote_jid: str, message_ids: Sequence[str]
    ) -> int:
        params = {
            "p_account": str(account),
            "p_instance": instance,
            "p_remote_jid": remote_jid,
            "p_ids": list(message_ids),
        }
        return int(await self._call("recording deletes", "crm_record_deletes", params))

    async def deleted_ids(self, account: uuid.UUID, instance: str, remote_jid: str) -> set[str]:
        params = {"p_account": str(account), "p_instance": instance, "p_remote_jid": remote_jid}
        return set(await self._call("reading deletes", "crm_deleted_ids", params) or ())

    async def deleted_ids_of(
        self, account: uuid.UUID, instance: str, remote_jids: Sequence[str]
    ) -> dict[str, set[str]]:
        found = await asyncio.gather(
            *(self.deleted_ids(account, instance, jid) for jid in remote_jids)
        )
        return {jid: ids for jid, ids in zip(remote_jids, found, strict=True) if ids}

    async def remember_lid(self, instance: str, lid: str, phone_jid: str) -> bool:
        params = {"p_instance": instance, "p_lid": lid, "p_phone": phone_jid}
        return bool(await self._call("remembering a LID", "crm_remember_lid", params))

    async def lid_phone(self, instance: str, lid: str) -> str | None:
        params = {"p_instance": instance, "p_lid": lid}
        phone = await self._call("reading a LID", "crm_lid_phone", params)
        return None if phone is None else str(phone)

    async def create_api_key(
        self, key_hash: str, prefix: str, account: uuid.UUID, name: str | None
    ) -> ApiKey:
        params = {"p_hash": key_hash, "p_prefix": prefix, "p_account": str(account), "p_name": name}
        data = await self._call(
            "creating an API key", "crm_api_key_create", params, repeatable=False
        )
        return msgspec.convert(data, ApiKey)

    async def list_api_keys(self) -> list[ApiKey]:
        data = await self._call("listing API keys", "crm_api_key_list", {})
        return msgspec.convert(data or [], list[ApiKey])

    async def revoke_api_key(self, ref: str) -> int:
        return int(await self._call("revoking an API key", "crm_api_key_revoke", {"p_ref": ref}))

    async def api_key_account(self, key_hash: str) -> uuid.UUID | None:
        data = await self._call("checking an API key", "crm_api_key_account", {"p_hash": key_hash})
        return uuid.UUID(data) if data else None

    # -- webhook endpoints (service/adapters/stores/webhooks.py) -------------------------
    async def add_webhook_endpoint(
        self, account: uuid.UUID, url: str, secret: str, events: list[str] | None
    ) -> WebhookEndpoint:
        params = {"p_account": str(account), "p_url": url, "p_secret": secret, "p_events": events}
        data = await self._call(
            "adding a webhook endpoint", "crm_webhook_endpoint_add", params, repeatable=False
        )
        return msgspec.convert(data, WebhookEndpoint)

    async def list_webhook_endpoints(self, account: uuid.UUID | None) -> list[WebhookEndpoint]:
        params = {"p_account": None if account is None else str(account)}
        data = await self._call("listing webhook endpoints", "crm_webhook_endpoint_list", params)
        return msgspec.convert(data or [], list[WebhookEndpoint])

    async def remove_webhook_endpoint(self, endpoint_id: uuid.UUID) -> bool:
        params = {"p_id": str(endpoint_id)}
        data = await self._call(
            "removing a webhook endpoint", "crm_webhook_endpoint_remove", params
        )
        return bool(data)

    async def webhook_endpoints_for(
        self, account: uuid.UUID, event_type: str
    ) -> list[WebhookEndpoint]:
        params = {"p_account": str(account), "p_type": event_type}
        data = await self._call("reading webhook endpoints", "crm_webhook_endpoints_for", params)
        return msgspec.convert(data or [], list[WebhookEndpoint])

    async def claim_webhook_delivery(
        self,
        webhook_id: str,
        account: uuid.UUID,
        endpoint_id: uuid.UUID,
        token: uuid.UUID,
        lease_seconds: float,
    ) -> Claim:
        # Repeatable: asking again under the same token answers the same.
        params = {
            "p_webhook_id": webhook_id,
            "p_account": str(account),
            "p_endpoint": str(endpoint_id),
            "p_token": str(token),
            "p_lease_seconds": lease_seconds,
        }
        data = await self._call("claiming a webhook delivery", "crm_webhook_claim", params)
        return msgspec.convert(data, Claim)

    async def finish_webhook_delivery(
        self,
        webhook_id: str,
        account: uuid.UUID,
        token: uuid.UUID,
        accepted: bool,
        status: int | None,
    ) -> bool:
        params = {
            "p_webhook_id": webhook_id,
            "p_account": str(account),
            "p_token": str(token),
            "p_accepted": accepted,
            "p_status": status,
        }
        data = await self._call("finishing a webhook delivery", "crm_webhook_finish", params)
        return bool(data)

    async def _call(
        self, doing: str, function: str, params: dict[str, Any], *, repeatable: bool = True
    ) -> Any:
        response = await self._run(
            doing, lambda: self._client.rpc(function, params).execute(), repeatable=repeatable
        )
        return response.data

    async def remove_instance(self, instance: str) -> bool:
        response = await self._run(
            "removing an instance",
            lambda: (
                self._client.table(INSTANCES)
                .delete()
                .eq("instance_name", instance)
                .select("instance_name")
                .execute()
            ),
            repeatable=False,
        )
        return bool(response.data)

    # -- requests ---------------------------------------------------------------------
    def _leads(self) -> Any:
        return self._client.table(LEADS)

    def _instances(self) -> Any:
        return self._client.table(INSTANCES)

    async def _run(
        self, doing: str, send: Callable[[], Awaitable[T]], *, repeatable: bool = True
    ) -> T:
        """Send, retrying transient failures; map errors to the store's exceptions.

        `repeatable`: sending the request twice does no harm (reads; the upsert, update and
        mapping functions). Others are repeated only when they surely did not run.
        """
        last: BaseException | None = None
        for attempt in range(self._attempts):
            if attempt:
                delay = min(self._backoff * 2 ** (attempt - 1), 5.0)
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
            try:
                return await send()
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                last = exc  # never reached the server: always safe to repeat
            except httpx.TransportError as exc:
                last = exc
                if not repeatable:
                    break
            except SupabaseHttpError as exc:
                last = exc
                if not exc.transient or (exc.may_have_run and not repeatable):
                    raise _domain_error(exc, doing, self._url) from exc
            if attempt + 1 < self._attempts:
                logger.warning(
                    "results store request failed; retrying",
                    doing=doing,
                    attempt=attempt + 1,
                    error=type(last).__name__,
                )
        raise StoreUnavailableError(
            f"Supabase at {self._url} unavailable while {doing} ({type(last).__name__}: {last})"
        ) from last


def _filtered(builder: Any, query: LeadQuery) -> Any:
    builder = builder.eq("user_account_id", str(query.user_account_id))
    if query.instance_name is not None:
        builder = builder.eq("instance_name", query.instance_name)
    if query.interest_level is not None:
        builder = builder.eq("interest_level", query.interest_level)
    if query.min_score is not None:
        builder = builder.gte("score", query.min_score)
    if query.funnel_stage is not None:
        builder = builder.eq("funnel_stage", query.funnel_stage)
    if query.qualification_complete is True:
        builder = builder.is_("qualification_complete", True)
    elif query.qualification_complete is False:
        # NULL (rows of the original service) counts as not complete, as in the SQL store.
        builder = builder.not_.is_("qualification_complete", True)
    return builder


def _ordered(builder: Any) -> Any:
    return (
        builder.order("score", desc=True, nullsfirst=False)
        .order("last_message", desc=True, nullsfirst=False)
        .order("id", desc=True)
    )


def _domain_error(exc: SupabaseHttpError, doing: str, url: str) -> Exception:
    if exc.status == 416:
        return _OffsetPastEnd(exc.total or 0)
    if exc.code == "23505":
        return DuplicateLeadError("a lead for this instance and phone exists already")
    if exc.status in (401, 403):
        return access_error(exc)
    if exc.code in _MISSING_OBJECT:
        return StoreAccessError(
            f"Supabase lacks this service's tables or functions ({exc.message}): "
            f"run the SQL of `crm-backend migrate --print` in Supabase's SQL editor"
        )
    if exc.status == 400 and exc.code and exc.code[:2] in ("22", "23"):
        return ValueError(f"invalid value: {exc.message}")
    return StoreUnavailableError(f"Supabase error while {doing}: {exc}")


def access_error(exc: SupabaseHttpError) -> StoreAccessError:
    """What a 401/403 means: the key, or privileges the migration grants.

    PostgREST answers "permission denied" (42501) with 401 when the request ran as the anon
    role and with 403 for any other role (PostgREST's Error.hs, mapSQLtoHTTP): a 403 means
    the service role lacks a grant, not that the key is wrong.
    """
    if exc.code == "42501" and exc.status == 403:
        return StoreAccessError(
            f"Supabase refused the service role ({exc.message}): its grants are missing; "
            f"{_REMIGRATE} (since 2026-10-30 Supabase grants nothing on new tables by itself)"
        )
    if exc.code == "42501":
        return StoreAccessError(
            f"{KEY_VARIABLE} is not the service key: Supabase ran the request as the anon "
            f"role ({exc.message}); {_SET_THE_SERVICE_KEY}"
        )
    return StoreAccessError(
        f"Supabase rejected {KEY_VARIABLE} (HTTP {exc.status}: {exc.message}); "
        f"{_SET_THE_SERVICE_KEY}"
    )
