"""Results store over a direct PostgreSQL connection (asyncpg pool).

Works through Supabase's transaction pooler (pgbouncer): no statement cache (prepared
statements do not survive a pooled server connection), no session state, every
operation a single statement. The write rules are the SQL functions of migrations/, the
same ones the Supabase store calls over REST.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg
import msgspec

from service.adapters.pg_pool import keep_session
from service.adapters.stores.base import (
    STATE_COLUMNS,
    AnalysisWrite,
    ApiKey,
    DuplicateLeadError,
    InstanceMapping,
    InstanceMove,
    InstanceOwnedError,
    LeadQuery,
    LeadStats,
    OutboxEvent,
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
from service.domain.history import Cause, FunnelRow, HistoryPage
from service.domain.lead import LeadRow
from service.domain.webhooks import Claim, WebhookEndpoint

# SQL here is built only from fixed column tuples and fixed fragments (the S608
# exemptions below); every value is a query parameter.

# Failures that say "the database is not reachable right now", not "the request is wrong".
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,  # SQLSTATE 08*
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InsufficientResourcesError,  # 53*
    asyncpg.OperatorInterventionError,  # 57*: shutdown, statement timeout
    asyncpg.TransactionRollbackError,  # 40*: deadlock, serialization
    # The pool reconnects on demand: these come from a reconnect, not from the query.
    asyncpg.InvalidCatalogNameError,
    asyncpg.InvalidAuthorizationSpecificationError,
)
# Anything that stops a pool from opening (wrong password, unknown database, ...).
_CONNECT_FAILURES: tuple[type[BaseException], ...] = (
    *_UNAVAILABLE,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)
# Bad values (enum/score checks, malformed input): the caller's mistake.
_INVALID: tuple[type[BaseException], ...] = (
    asyncpg.CheckViolationError,
    asyncpg.NotNullViolationError,
    asyncpg.DataError,  # 22*
)

_ORDER = "COALESCE(score, -1) DESC, COALESCE(last_message, '-infinity'::timestamptz) DESC, id DESC"
_STATE_SQL = (
    f"SELECT {', '.join(STATE_COLUMNS)} FROM dialog_analysis "  # noqa: S608
    "WHERE user_account_id = $1 AND instance_name = $2 AND contact_phone = $3"
)
_STATES_SQL = (
    f"SELECT contact_phone, {', '.join(STATE_COLUMNS)} FROM dialog_analysis "  # noqa: S608
    "WHERE user_account_id = $1 AND instance_name = $2 AND contact_phone = ANY($3::text[])"
)
# crm_deleted_ids (service/sql/0005_evolution_events.sql) for many chats at once.
_DELETED_OF_SQL = (
    "SELECT remote_jid, array_agg(message_id ORDER BY message_id) AS ids "
    "FROM crm_deleted_messages WHERE user_account_id = $1 AND instance_name = $2 "
    "AND remote_jid = ANY($3::text[]) GROUP BY remote_jid"
)
# One statement, one transaction: the write function runs once per write, in order.
_UPSERT_MANY_SQL = (
    "SELECT crm_upsert_analysis(w) AS result "
    "FROM unnest($1::jsonb[]) WITH ORDINALITY AS t(w, n) ORDER BY n"
)
_PAGE_SQL = (
    "SELECT {columns} FROM crm_leads_page("
    "p_account => $1, p_instance => $2, p_interest => $3, p_min_score => $4, "
    "p_stage => $5, p_qualified => $6, p_after_score => $7, p_after_last => $8, "
    "p_after_id => $9, p_limit => $10)"
)
_INSTANCE_COLUMNS = "instance_name, user_account_id, created_at"


class PostgresStore:
    """ResultsStore on an asyncpg pool. Open with `await PostgresStore.open(dsn)`."""

    def __init__(self, pool: asyncpg.Pool, dsn: str) -> None:
        self._pool = pool
        self._where = describe_dsn(dsn)

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        command_timeout: float = 30.0,
    ) -> PostgresStore:
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                command_timeout=command_timeout,
                statement_cache_size=0,
                init=_init_connection,
                reset=keep_session,
                timeout=15,
            )
        except _CONNECT_FAILURES as exc:
            raise connection_error(dsn, exc) from None
        return cls(pool, dsn)

    async def close(self) -> None:
        await self._pool.close()

    async def ping(self) -> None:
        with self._guard("ping"):
            await self._pool.fetchval("SELECT 1")

    # -- pipeline ---------------------------------------------------------------------
    async def get_state(self, account: uuid.UUID, instance: str, phone: str) -> StoredState | None:
        with self._guard("reading a lead"):
            record = await self._pool.fetchrow(_STATE_SQL, account, instance, phone)
        return None if record is None else state_from_record(dict(record))

    async def upsert_analysis(self, write: AnalysisWrite) -> UpsertResult:
        with self._guard("storing an analysis"):
            result = await self._pool.fetchval("SELECT crm_upsert_analysis($1::jsonb)", write)
        return msgspec.convert(result, UpsertResult)

    async def get_states(
        self, account: uuid.UUID, instance: str, phones: Sequence[str]
    ) -> dict[str, StoredState]:
        if not phones:
            return {}
        with self._guard("reading leads"):
            records = await self._pool.fetch(_STATES_SQL, account, instance, list(phones))
        return {r["contact_phone"]: state_from_record(dict(r)) for r in records}

    async def upsert_analyses(self, writes: Sequence[AnalysisWrite]) -> list[UpsertResult]:
        if not writes:
            return []
        with self._guard("storing analyses"):
            records = await self._pool.fetch(_UPSERT_MANY_SQL, list(writes))
        return [msgspec.convert(r["result"], UpsertResult) for r in records]

    # -- REST -------------------------------------------------------------------------
    async def get_lead(
        self, account: uuid.UUID, lead_id: uuid.UUID, *, include_messages: bool = False
    ) -> LeadRow | None:
        columns = ", ".join(lead_columns(include_messages))
        with self._guard("reading a lead"):
            record = await self._pool.fetchrow(
                f"SELECT {columns} FROM dialog_analysis WHERE id = $1 AND user_account_id = $2",  # noqa: S608
                lead_id,
                account,
            )
        return None if record is None else lead_from_record(dict(record))

    async def query_leads(self, query: LeadQuery) -> tuple[list[LeadRow], int]:
        where, args = _filters(query)
        columns = ", ".join(lead_columns(query.include_messages))
        n = len(args)
        with self._guard("listing leads"):
            total = await self._pool.fetchval(
                f"SELECT count(*) FROM dialog_analysis WHERE {where}",  # noqa: S608
                *args,
            )
            records = await self._pool.fetch(
                f"SELECT {columns} FROM dialog_analysis WHERE {where} "  # noqa: S608
                f"ORDER BY {_ORDER} LIMIT ${n + 1} OFFSET ${n + 2}",
                *args,
                max(query.limit, 0),
                max(query.offset, 0),
            )
        return [lead_from_record(dict(r)) for r in records], int(total)

    async def iter_leads(self, query: LeadQuery, chunk_size: int = 1000) -> AsyncIterator[LeadRow]:
        """Keyset pagination: one short query per chunk, no cursor held open."""
        sql = _PAGE_SQL.format(columns=", ".join(lead_columns(query.include_messages)))
        after: tuple[int | None, Any, uuid.UUID | None] = (None, None, None)
        while True:
            with self._guard("listing leads"):
                records = await self._pool.fetch(
                    sql,
                    query.user_account_id,
                    query.instance_name,
                    query.interest_level,
                    query.min_score,
                    query.funnel_stage,
                    query.qualification_complete,
                    *after,
                    max(chunk_size, 1),
                )
            if not records:
                return
            for record in records:
                yield lead_from_record(dict(record))
            last = records[-1]
            after = (last["score"], last["last_message"], last["id"])

    async def stats(self, account: uuid.UUID, instance: str | None) -> LeadStats:
        with self._guard("computing stats"):
            result = await self._pool.fetchval("SELECT crm_lead_stats($1, $2)", account, instance)
        return msgspec.convert(result, LeadStats)

    async def create_lead(self, row: LeadRow, cause: Cause | None = None) -> LeadRow:
        columns = ", ".join(lead_columns(False))
        with self._guard("creating a lead"):
            record = await self._pool.fetchrow(
                f"SELECT {columns} FROM crm_create_lead($1::jsonb, $2::jsonb)",  # noqa: S608
                creation_values(row),
                cause_json(cause),
            )
        if record is None:  # pragma: no cover - the function returns the row it inserted
            raise RuntimeError("insert returned no row")
        return lead_from_record(dict(record))

    async def update_lead(
        self,
        account: uuid.UUID,
        lead_id: uuid.UUID,
        changes: dict[str, Any],
        derived: dict[str, Any] | None = None,
        cause: Cause | None = None,
    ) -> LeadRow | None:
        check_changes(changes, derived)
        columns = ", ".join(lead_columns(False))
        with self._guard("updating a lead"):
            record = await self._pool.fetchrow(
                f"SELECT {columns} FROM crm_update_lead($1, $2, $3::jsonb, $4::jsonb, "  # noqa: S608
                "$5::jsonb)",
                account,
                lead_id,
                changes,
                derived or {},
                cause_json(cause),
            )
        return None if record is None else lead_from_record(dict(record))

    # -- history and funnel ---------------------------------------------------------------
    async def lead_history(
        self, account: uuid.UUID, lead_id: uuid.UUID, limit: int, offset: int
    ) -> HistoryPage | None:
        with self._guard("reading a lead's history"):
            result = await self._pool.fetchval(
                "SELECT crm_lead_history_page($1, $2, $3, $4)", account, lead_id, limit, offset
            )
        return None if result is None else msgspec.convert(result, HistoryPage)

    async def funnel(
        self,
        account: uuid.UUID,
        since: datetime,
        until: datetime,
        instance: str | None,
        stages: Sequence[str],
    ) -> dict[str, FunnelRow]:
        with self._guard("computing the funnel"):
            result = await self._pool.fetchval(
                "SELECT crm_funnel($1, $2, $3, $4, $5)",
                account,
                since,
                until,
                instance,
                list(stages),
            )
        return msgspec.convert(result, dict[str, FunnelRow])

    # -- outbox -------------------------------------------------------------------------
    async def claim_outbox(self, limit: int, lease_seconds: float) -> list[OutboxEvent]:
        with self._guard("claiming events"):
            result = await self._pool.fetchval(
                "SELECT crm_outbox_claim($1, $2)", limit, lease_seconds
            )
        return msgspec.convert(result, list[OutboxEvent])

    async def outbox_published(self, ids: Sequence[uuid.UUID]) -> int:
        with self._guard("marking events published"):
            marked: int = await self._pool.fetchval("SELECT crm_outbox_done($1)", list(ids))
        return marked

    async def release_outbox(self, ids: Sequence[uuid.UUID]) -> int:
        with self._guard("releasing events"):
            released: int = await self._pool.fetchval("SELECT crm_outbox_release($1)", list(ids))
        return released

    async def outbox_depth(self) -> int:
        with self._guard("counting events"):
            depth: int = await self._pool.fetchval("SELECT crm_outbox_depth()")
        return depth

    async def delete_lead(self, account: uuid.UUID, lead_id: uuid.UUID) -> bool:
        with self._guard("deleting a lead"):
            deleted = await self._pool.fetchval(
                "DELETE FROM dialog_analysis WHERE id = $1 AND user_account_id = $2 RETURNING id",
                lead_id,
                account,
            )
        return deleted is not None

    # -- instances --------------------------------------------------------------------
    async def instance_account(self, instance: str) -> uuid.UUID | None:
        with self._guard("reading an instance"):
            account: uuid.UUID | None = await self._pool.fetchval(
                "SELECT user_account_id FROM whatsapp_instances WHERE instance_name = $1",
                instance,
            )
        return account

    async def add_instance(self, instance: str, account: uuid.UUID) -> InstanceMapping:
        with self._guard("mapping an instance"):
            result = await self._pool.fetchval("SELECT crm_add_instance($1, $2)", instance, account)
        return checked_mapping(result, instance, account)

    async def list_instances(self) -> list[InstanceMapping]:
        with self._guard("listing instances"):
            records = await self._pool.fetch(
                f"SELECT {_INSTANCE_COLUMNS} FROM whatsapp_instances ORDER BY instance_name"  # noqa: S608
            )
        return [msgspec.convert(dict(r), InstanceMapping) for r in records]

    async def remove_instance(self, instance: str) -> bool:
        with self._guard("removing an instance"):
            removed = await self._pool.fetchval(
                "DELETE FROM whatsapp_instances WHERE instance_name = $1 RETURNING instance_name",
                instance,
            )
        return removed is not None

    async def move_instance(self, instance: str, account: uuid.UUID) -> InstanceMove:
        with self._guard("moving an instance"):
            result = await self._pool.fetchval(
                "SELECT crm_move_instance($1, $2)", instance, account
            )
        return msgspec.convert(result, InstanceMove)

    async def foreign_leads(self, instance: str, account: uuid.UUID) -> int:
        with self._guard("counting an instance's leads"):
            count: int = await self._pool.fetchval(
                "SELECT crm_foreign_leads($1, $2)", instance, account
            )
        return count

    async def forget_dialog_time(self, account: uuid.UUID, instance: str, phone: str) -> bool:
        with self._guard("resetting a lead"):
            done: bool = await self._pool.fetchval(
                "SELECT crm_forget_dialog_time($1, $2, $3)", account, instance, phone
            )
        return done

    # -- what only Evolution's events tell ------------------------------------------------
    async def record_deletes(
        self, account: uuid.UUID, instance: str, remote_jid: str, message_ids: Sequence[str]
    ) -> int:
        with self._guard("recording deletes"):
            added: int = await self._pool.fetchval(
                "SELECT crm_record_deletes($1, $2, $3, $4)",
                account,
                instance,
                remote_jid,
                list(message_ids),
            )
        return added

    async def deleted_ids(self, account: uuid.UUID, instance: str, remote_jid: str) -> set[str]:
        with self._guard("reading deletes"):
            ids: list[str] = await self._pool.fetchval(
                "SELECT crm_deleted_ids($1, $2, $3)", account, instance, remote_jid
            )
        return set(ids)

    async def deleted_ids_of(
        self, account: uuid.UUID, instance: str, remote_jids: Sequence[str]
    ) -> dict[str, set[str]]:
        if not remote_jids:
            return {}
        with self._guard("reading deletes"):
            records = await self._pool.fetch(_DELETED_OF_SQL, account, instance, list(remote_jids))
        return {r["remote_jid"]: set(r["ids"]) for r in records}

    async def remember_lid(self, instance: str, lid: str, phone_jid: str) -> bool:
        with self._guard("remembering a LID"):
            added: bool = await self._pool.fetchval(
                "SELECT crm_remember_lid($1, $2, $3)", instance, lid, phone_jid
            )
        return added

    async def lid_phone(self, instance: str, lid: str) -> str | None:
        with self._guard("reading a LID"):
            phone: str | None = await self._pool.fetchval(
                "SELECT crm_lid_phone($1, $2)", instance, lid
            )
        return phone

    # -- API keys ---------------------------------------------------------------------
    async def create_api_key(
        self, key_hash: str, prefix: str, account: uuid.UUID, name: str | None
    ) -> ApiKey:
        with self._guard("creating an API key"):
            result = await self._pool.fetchval(
                "SELECT crm_api_key_create($1, $2, $3, $4)", key_hash, prefix, account, name
            )
        return msgspec.convert(result, ApiKey)

    async def list_api_keys(self) -> list[ApiKey]:
        with self._guard("listing API keys"):
            result = await self._pool.fetchval("SELECT crm_api_key_list()")
        return msgspec.convert(result, list[ApiKey])

    async def revoke_api_key(self, ref: str) -> int:
        with self._guard("revoking an API key"):
            count: int = await self._pool.fetchval("SELECT crm_api_key_revoke($1)", ref)
        return count

    async def api_key_account(self, key_hash: str) -> uuid.UUID | None:
        with self._guard("checking an API key"):
            account: uuid.UUID | None = await self._pool.fetchval(
                "SELECT crm_api_key_account($1)", key_hash
            )
        return account

    # -- webhook endpoints (service/adapters/stores/webhooks.py) -------------------------
    async def add_webhook_endpoint(
        self, account: uuid.UUID, url: str, secret: str, events: list[str] | None
    ) -> WebhookEndpoint:
        with self._guard("adding a webhook endpoint"):
            result = await self._pool.fetchval(
                "SELECT crm_webhook_endpoint_add($1, $2, $3, $4)", account, url, secret, events
            )
        return msgspec.convert(result, WebhookEndpoint)

    async def list_webhook_endpoints(self, account: uuid.UUID | None) -> list[WebhookEndpoint]:
        with self._guard("listing webhook endpoints"):
            result = await self._pool.fetchval("SELECT crm_webhook_endpoint_list($1)", account)
        return msgspec.convert(result, list[WebhookEndpoint])

    async def remove_webhook_endpoint(self, endpoint_id: uuid.UUID) -> bool:
        with self._guard("removing a webhook endpoint"):
            done: bool = await self._pool.fetchval(
                "SELECT crm_webhook_endpoint_remove($1)", endpoint_id
            )
        return done

    async def webhook_endpoints_for(
        self, account: uuid.UUID, event_type: str
    ) -> list[WebhookEndpoint]:
        with self._guard("reading webhook endpoints"):
            result = await self._pool.fetchval(
                "SELECT crm_webhook_endpoints_for($1, $2)", account, event_type
            )
        return msgspec.convert(result, list[WebhookEndpoint])

    async def claim_webhook_delivery(
        self,
        webhook_id: str,
        account: uuid.UUID,
        endpoint_id: uuid.UUID,
        token: uuid.UUID,
        lease_seconds: float,
    ) -> Claim:
        with self._guard("claiming a webhook delivery"):
            result = await self._pool.fetchval(
                "SELECT crm_webhook_claim($1, $2, $3, $4, $5)",
                webhook_id,
                account,
                endpoint_id,
                token,
                lease_seconds,
            )
        return msgspec.convert(result, Claim)

    async def finish_webhook_delivery(
        self,
        webhook_id: str,
        account: uuid.UUID,
        token: uuid.UUID,
        accepted: bool,
        status: int | None,
    ) -> bool:
        with self._guard("finishing a webhook delivery"):
            done: bool = await self._pool.fetchval(
                "SELECT crm_webhook_finish($1, $2, $3, $4, $5)",
                webhook_id,
                account,
                token,
                accepted,
                status,
            )
        return done

    # -- errors -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _guard(self, doing: str) -> Iterator[None]:
        try:
            yield
        except asyncpg.UniqueViolationError:
            raise DuplicateLeadError("a lead for this instance and phone exists already") from None
        except _INVALID as exc:
            raise ValueError(f"invalid value: {getattr(exc, 'message', exc)}") from None
        except _UNAVAILABLE as exc:
            raise StoreUnavailableError(
                f"results database {self._where} unavailable while {doing} ({type(exc).__name__})"
            ) from exc


def checked_mapping(result: Any, instance: str, account: uuid.UUID) -> InstanceMapping:
    """The stored mapping; InstanceOwnedError when another account holds the instance."""
    mapping = msgspec.convert(result, InstanceMapping)
    if mapping.user_account_id != account:
        raise InstanceOwnedError(
            f"instance {instance!r} is mapped to another account "
            f"({mapping.user_account_id}); `crm-backend instances move {instance} --account "
            f"{account}` moves it together with its leads"
        )
    return mapping


def _filters(query: LeadQuery) -> tuple[str, list[Any]]:
    """WHERE clause (fixed fragments, values as parameters) for a list query."""
    clauses = ["user_account_id = $1"]
    args: list[Any] = [query.user_account_id]
    optional: list[tuple[str, Any]] = [
        ("instance_name = ${}", query.instance_name),
        ("interest_level = ${}", query.interest_level),
        ("score >= ${}", query.min_score),
        ("funnel_stage = ${}", query.funnel_stage),
        ("(qualification_complete IS TRUE) = ${}", query.qualification_complete),
    ]
    for fragment, value in optional:
        if value is not None:
            args.append(value)
            clauses.append(fragment.format(len(args)))
    return " AND ".join(clauses), args


async def _init_connection(conn: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(
            name, schema="pg_catalog", encoder=_encode_json, decoder=msgspec.json.decode
        )


def _encode_json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def connection_error(dsn: str, exc: BaseException) -> StoreUnavailableError:
    """A StoreUnavailableError naming host and database (never the password)."""
    reason = redact(str(exc) or type(exc).__name__, dsn)
    return StoreUnavailableError(
        f"cannot connect to the results database {describe_dsn(dsn)}: {reason} "
        "(check RESULTS_DATABASE_URL)"
    )


def describe_dsn(dsn: str) -> str:
    """`host:port/dbname` of a PostgreSQL URL, never its credentials."""
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or "local socket"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(unparsable URL)"
    database = parts.path.lstrip("/") or "(default database)"
    return f"{host}{port}/{database}"


def redact(text: str, dsn: str) -> str:
    """`text` with the URL (and its password, if any) masked."""
    text = text.replace(dsn, describe_dsn(dsn))
    try:
        password = urlsplit(dsn).password
    except ValueError:
        password = None
    if password:
        for secret in {password, unquote(password)}:
            text = text.replace(secret, "***")
    return text
