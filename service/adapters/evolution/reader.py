"""Read-only access to Evolution API's PostgreSQL: contact lists and dialogs.

Everything heavy happens in SQL: an instance's messages are never loaded into Python.
Two queries matter:

- the contacts aggregate (one pass over the instance's messages, grouped by the contact's
  phone JID), streamed to the caller through a server-side cursor;
- the dialog of one contact (its newest messages plus counts over its whole history),
  which the expression indexes of `service.adapters.evolution.index` make an index lookup.

Contact identity follows `service.adapters.evolution.identity`: whichever of `remoteJid`,
`remoteJidAlt`, `senderPn` is a phone JID; LID-addressed messages that carry no phone at
all join the contact whose phone was seen with that LID in other messages.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import AsyncGenerator, Mapping
from collections.abc import Set as AbstractSet
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import asyncpg
import msgspec
from loguru import logger

from service.adapters.evolution.identity import (
    LID_SUFFIX,
    PHONE_SUFFIX,
    lid_jid_sql,
    normalize_phone,
    phone_digits,
    phone_jid_sql,
    phone_jid_sql_from,
)
from service.adapters.evolution.message_text import (
    SKIPPED_TYPES,
    WRAPPED_NON_TURNS,
    WRAPPER_TYPES,
    message_text,
)
from service.adapters.pg_pool import keep_session
from service.config import parse_database_url
from service.domain.dialog import Contact, ContactSummary, Dialog, DialogMessage, from_unix

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Names Evolution gives the business's own messages sent from the phone.
_NOT_A_NAME = ("", "Você")
# Memory for the contacts aggregate's sort: the whole instance's (contact, message id)
# pairs must be sorted once; PostgreSQL's default of 4 MB spills to disk at ~50k messages.
_AGGREGATE_WORK_MEM = "64MB"
_AGGREGATE_WORKERS = 2
_PAGE_SIZE = 500
# Connections to the Evolution database per process (reads are short; parallel analyses
# beyond this wait for a connection).
READER_POOL_SIZE = 10
# Errors that mean "the database is not reachable right now" (transient), as opposed to
# a bug in a query.
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.PostgresConnectionError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)

# At connect time every server answer is a reason to give up (bad password, no database).
_CONNECT_ERRORS: tuple[type[BaseException], ...] = (*_CONNECTION_ERRORS, asyncpg.PostgresError)


class EvolutionUnavailableError(Exception):
    """Evolution's database cannot be reached (transient: retry later)."""


def quote_ident(name: str) -> str:
    """A validated, double-quoted schema name (names come from settings, never from users)."""
    if not _IDENT.fullmatch(name):
        raise ValueError(f"not a plain PostgreSQL identifier: {name!r}")
    return f'"{name}"'


def describe_dsn(dsn: str) -> str:
    """`host:port/db` of a DSN, for error messages (never the password)."""
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or "localhost"
        port = parts.port or 5432
    except ValueError:
        return "<unparsable DSN>"
    database = unquote(parts.path.lstrip("/")) or parts.username or "postgres"
    return f"{host}:{port}/{database}"


# A "MessageUpdate" row that marks its message deleted for everyone. Evolution leaves the
# message's row as it was and writes this status-less update (whatsapp.baileys.service.ts,
# messages.update): status DELETED up to 2.3.6; from 2.3.7 on the absent status defaults
# to SERVER_ACK, which a received message never gets otherwise. Evolution writes the same
# row for an edit: the edit marks its message EDITED, which keeps that copy (an older
# copy of the edited message then drops out). Poll votes are updates too: not deletes.
_DELETES = (
    'u."pollUpdates" IS NULL'
    " AND (u.status = 'DELETED' OR (u.status = 'SERVER_ACK' AND NOT u.\"fromMe\"))"
    " AND m.status IS DISTINCT FROM 'EDITED'"
)


class _Sql:
    """SQL fragments shared by the queries, for one schema."""

    def __init__(self, schema: str) -> None:
        quoted = quote_ident(schema)
        self.message = f'{quoted}."Message"'
        self.instance = f'{quoted}."Instance"'
        self.update = f'{quoted}."MessageUpdate"'
        self.phone = phone_jid_sql('m."key"')
        self.lid = lid_jid_sql('m."key"')
        self.instance_id = f"(SELECT i.id FROM {self.instance} i WHERE i.name = $1 LIMIT 1)"  # noqa: S608
        # The business's own number: never a contact (Baileys 7 can put it in
        # remoteJidAlt of the business's own messages in a LID chat).
        self.owner = (
            f"(SELECT split_part(split_part(i.\"ownerJid\", '@', 1), ':', 1) || '{PHONE_SUFFIX}'"  # noqa: S608
            f" FROM {self.instance} i WHERE i.name = $1 LIMIT 1)"
        )
        # The instance's id and own number, read once per query.
        self.inst = f"inst AS MATERIALIZED (SELECT {self.instance_id} AS id, {self.owner} AS owner)"
        # A message that is a dialog turn: not deleted, not a reaction/protocol message
        # (also not one inside an ephemeral/view-once wrapper: `message_text` agrees).
        # $2 is always the SKIPPED_TYPES array.
        self.live = (
            'm."messageType" <> ALL($2::text[])'
            " AND (m.\"key\"->>'deleted') IS DISTINCT FROM 'true'"
            " AND m.status IS DISTINCT FROM 'DELETED'"
            f" AND {_wrapped_non_turn_sql('m')} IS NOT TRUE"
        )

    def not_deleted(self) -> str:
        """No "MessageUpdate" marks message `m` deleted. Matched on "keyId": Evolution
        always stores the WhatsApp id there (revoke, API delete and edit alike), which
        covers every stored copy. An anti-join keeps the contacts aggregate's parallel
        scan (a sub-plan would not)."""
        return (
            f'NOT EXISTS (SELECT 1 FROM {self.update} u WHERE u."keyId" = m."key"->>\'id\''  # noqa: S608
            f' AND u."instanceId" = m."instanceId" AND {_DELETES})'
        )

    def phone_is(self, param: str) -> str:
        """`phone JID = param`, as the contact index's condition plus a cheap pre-check.

        Without the index every row of the instance is tested: the pre-check (is remoteJid
        exactly this phone JID, or not a plain phone JID at all?) looks at remoteJid only
        and leaves the full expression to the few rows that need it.
        """
        rj = "m.\"key\"->>'remoteJid'"
        maybe = (
            f"COALESCE({rj} = {param} OR {rj} NOT LIKE '%{PHONE_SUFFIX}'"
            f" OR strpos({rj}, ':') > 0 OR ascii({rj}) NOT BETWEEN 48 AND 57, true)"
        )
        return f"({maybe} AND {self.phone} = {param})"


def _push_sql(alias: str) -> str:
    """The push name, NULL when it only repeats the chat JID's digits (Evolution's
    history-sync fallback, whatsapp.baileys.service.ts messaging-history.set)."""
    return f"NULLIF({alias}.\"pushName\", split_part({alias}.\"key\"->>'remoteJid', '@', 1))"


def _wrapped_non_turn_sql(alias: str) -> str:
    """True for a wrapper message (ephemeral, view once) holding a protocol message or a
    reaction; the test runs only on the (few) rows of a wrapper type."""
    types = ", ".join(f"'{t}'" for t in WRAPPER_TYPES)
    non_turns = ", ".join(f"'{t}'" for t in WRAPPED_NON_TURNS)
    inner = " OR ".join(
        f"{alias}.message->'{w}'->'message' ?| ARRAY[{non_turns}]" for w in WRAPPER_TYPES
    )
    return f'({alias}."messageType" IN ({types}) AND ({inner}))'


def _sort_key_sql(ts: str) -> str:
    """A message time as 10 digits (int4 shifted to be non-negative), so that the text
    `key || id` sorts as (time, id): a text max() then picks the newest message of a
    contact without a second sort or an ordered aggregate."""
    return f"lpad(({ts}::bigint + 2147483648)::text, 10, '0')"


def contacts_sql(schema: str) -> str:
    """The contacts aggregate. Parameters: $1 instance name, $2 skipped types,
    $3 min incoming, $4 since (unix seconds or NULL), $5 limit (or NULL), $6 names that
    are not names.

    One sort over the instance's messages de-duplicates them (one row per contact and
    WhatsApp id, its newest copy). Its leading keys are 64-bit hashes of contact and id,
    so almost every comparison is one of two integers (contact JIDs share long prefixes,
    which makes text comparisons slow); the texts follow the hashes, so a collision
    cannot merge two contacts or two messages. The same order groups the contacts.
    Newest-first choices (last message id, contact name) are text maxima over
    `_sort_key_sql(ts) || id [|| chr(1) || name]`: ids never hold control characters
    (WhatsApp ids and Evolution's row ids are printable), so chr(1) ends the id.
    """
    q = _Sql(schema)
    live = q.live
    lid = (
        f"CASE WHEN s.rj LIKE '%{LID_SUFFIX}' THEN s.rj"
        f" WHEN s.k->>'remoteJidAlt' LIKE '%{LID_SUFFIX}' THEN s.k->>'remoteJidAlt' END"
    )
    # The phone JID (never the business's own number); a LID-only chat is grouped under
    # its LID and mapped to a phone below.
    who = f"COALESCE(NULLIF({phone_jid_sql_from('s.rj', 's.k')}, s.owner), {lid})"
    t = _sort_key_sql("ts")
    return f"""
WITH dedup AS (
    -- One row per stored WhatsApp message: a message stored twice (an edit rewrites one
    -- copy and its timestamp) counts once, as its newest copy.
    SELECT DISTINCT ON (w.wh, w.who, w.kh, w.kid) w.wh, w.who, w.ts, w.kid, w.fm, w.push, w.lid
    FROM (
        SELECT v.*, hashtextextended(v.who, 0) AS wh, hashtextextended(v.kid, 0) AS kh
        FROM (
            SELECT {who} COLLATE "C" AS who, s.ts, s.kid, s.fm, s.push, {lid} AS lid
            FROM (
                SELECT m."key" AS k, m."key"->>'remoteJid' AS rj, m."messageTimestamp" AS ts,
                    COALESCE(m."key"->>'id', m.id) COLLATE "C" AS kid,
                    COALESCE(m."key"->>'fromMe' = 'true', false) AS fm,
                    {_push_sql("m")} AS push, o.owner
                FROM {q.message} m, (SELECT {q.owner} AS owner) o
                WHERE m."instanceId" = {q.instance_id} AND {live} AND {q.not_deleted()}
            ) s
        ) v
        -- No "WHERE who IS NOT NULL" here: each mention of `who` evaluates the identity
        -- expression again (subqueries are flattened). Messages without a contact (groups,
        -- ~3 %) sort as one more group, which the final WHERE drops.
    ) w
    ORDER BY w.wh, w.who, w.kh, w.kid, w.ts DESC
), per_jid AS (
    SELECT who,
        count(*) FILTER (WHERE NOT fm) AS incoming,
        count(*) FILTER (WHERE fm) AS outgoing,
        min(ts) AS first_ts, max(ts) AS last_ts,
        max({t} || kid) AS last,
        max({t} || kid || chr(1) || push) FILTER (WHERE NOT fm AND push <> ALL($6::text[]))
            AS named,
        max(lid) AS lid
    FROM dedup
    GROUP BY wh, who
), lidmap AS (
    -- LID → phone, from messages that carried both.
    SELECT lid, min(who) AS phone
    FROM per_jid
    WHERE lid IS NOT NULL AND who LIKE '%{PHONE_SUFFIX}'
    GROUP BY lid
), per_contact AS (
    -- LID-only chats join the phone seen with their LID; unknown LIDs are dropped.
    SELECT COALESCE(l.phone, p.who) AS phone,
        sum(p.incoming)::int AS incoming, sum(p.outgoing)::int AS outgoing,
        min(p.first_ts) AS first_ts, max(p.last_ts) AS last_ts,
        max(p.last) AS last, max(p.named) AS named
    FROM per_jid p LEFT JOIN lidmap l ON l.lid = p.who
    GROUP BY 1
)
SELECT phone, incoming, outgoing, first_ts, last_ts, substr(last, 11) AS last_id,
    substr(named, strpos(named, chr(1)) + 1) AS name
FROM per_contact
WHERE phone LIKE '%{PHONE_SUFFIX}' AND incoming >= $3 AND ($4::int IS NULL OR last_ts >= $4)
ORDER BY last_ts DESC, phone DESC
LIMIT $5
"""  # noqa: S608 - identifiers are validated (quote_ident), values are parameters


def dialog_sql(schema: str) -> str:
    """One contact's dialog. Parameters: $1 instance name, $2 skipped types,
    $3 phone JID, $4 message limit, $5 names that are not names, $6 ids of messages
    known deleted from events (crm_deleted_messages)."""
    q = _Sql(schema)
    live = q.live
    return f"""
WITH {q.inst}, lids AS (
    SELECT DISTINCT {q.lid} AS lid
    FROM {q.message} m
    WHERE m."instanceId" = (SELECT id FROM inst) AND {q.phone_is("$3")} AND {q.lid} IS NOT NULL
), hits AS (
    SELECT m.id, m."key", m."messageTimestamp", m."messageType", {_push_sql("m")} AS "pushName",
        m.status
    FROM {q.message} m
    WHERE m."instanceId" = (SELECT id FROM inst) AND {live}
        AND $3 IS DISTINCT FROM (SELECT owner FROM inst)
        AND ({q.phone_is("$3")}
            -- LID-only messages. `= ANY(ARRAY(...))` makes the LIDs an index condition
            -- on the LID index; COALESCE keeps the planner from answering "no phone"
            -- with the contact index (every group message has no phone either).
            -- A message without any phone has its LID in remoteJid (cheap pre-check).
            OR (m."key"->>'remoteJid' LIKE '%{LID_SUFFIX}' AND {q.lid} IS NOT NULL
                AND {q.lid} = ANY (ARRAY(SELECT lid FROM lids))
                AND COALESCE(NULLIF({q.phone}, (SELECT owner FROM inst)), '') = ''))
), dead AS (
    -- Messages deleted for everyone (every stored copy of them), found through the
    -- "MessageUpdate" index on "messageId".
    SELECT DISTINCT COALESCE(m."key"->>'id', m.id) COLLATE "C" AS kid
    FROM hits m JOIN {q.update} u ON u."messageId" = m.id
    WHERE {_DELETES}
    UNION
    SELECT unnest($6::text[]) COLLATE "C"
), dedup AS (
    -- One row per WhatsApp message id (a message can be stored twice).
    SELECT DISTINCT ON (kid) h.id, kid, fm, h."messageTimestamp" AS ts,
        h."messageType" AS type, h."pushName" AS push
    FROM hits h,
        LATERAL (SELECT COALESCE(h."key"->>'id', h.id) COLLATE "C" AS kid,
                        COALESCE(h."key"->>'fromMe' = 'true', false) AS fm) k
    WHERE NOT EXISTS (SELECT 1 FROM dead d WHERE d.kid = k.kid)
    ORDER BY kid, h."messageTimestamp" DESC, h.id
), stats AS (
    SELECT count(*) FILTER (WHERE NOT fm)::int AS incoming,
        count(*) FILTER (WHERE fm)::int AS outgoing,
        min(ts) AS first_ts, max(ts) AS last_ts,
        (array_agg(push ORDER BY ts DESC, kid DESC)
            FILTER (WHERE NOT fm AND push <> ALL($5::text[])))[1] AS name
    FROM dedup
), newest AS (
    SELECT * FROM dedup ORDER BY ts DESC, kid DESC LIMIT $4
)
SELECT s.incoming, s.outgoing, s.first_ts, s.last_ts, s.name,
    n.kid, n.fm, n.ts, n.type, msg.message
FROM stats s
LEFT JOIN (newest n JOIN {q.message} msg ON msg.id = n.id) ON true
ORDER BY n.ts, n.kid
"""  # noqa: S608 - identifiers are validated (quote_ident), values are parameters


def lid_phone_sql(schema: str) -> str:
    """A LID's phone JID. Parameters: $1 instance name, $2 LID JID."""
    q = _Sql(schema)
    return f"""
SELECT p.phone FROM (
    SELECT {q.phone} AS phone
    FROM {q.message} m
    WHERE m."instanceId" = {q.instance_id} AND {q.lid} = $2
) p
WHERE p.phone IS NOT NULL AND p.phone IS DISTINCT FROM {q.owner}
LIMIT 1
"""  # noqa: S608 - identifiers are validated (quote_ident), values are parameters


def unpaired_lids_sql(schema: str) -> str:
    """How many LID-only chats have no phone in any stored message (so the contacts
    aggregate cannot place them). Parameters: $1 instance name, $2 skipped types."""
    q = _Sql(schema)
    return f"""
WITH {q.inst}, lone AS (
    SELECT DISTINCT {q.lid} AS lid
    FROM {q.message} m
    WHERE m."instanceId" = (SELECT id FROM inst) AND {q.live}
        AND m."key"->>'remoteJid' LIKE '%{LID_SUFFIX}' AND {q.lid} IS NOT NULL
        AND COALESCE(NULLIF({q.phone}, (SELECT owner FROM inst)), '') = ''
)
SELECT count(*)::int FROM lone l
WHERE NOT EXISTS (
    SELECT 1 FROM {q.message} m
    WHERE m."instanceId" = (SELECT id FROM inst) AND {q.lid} = l.lid
        AND NULLIF({q.phone}, (SELECT owner FROM inst)) IS NOT NULL
)
"""  # noqa: S608 - identifiers are validated (quote_ident), values are parameters


def message_contact_sql(schema: str) -> str:
    """Phone JID (or LID) of the chat of a message. Parameters: $1 instance, $2 key id."""
    q = _Sql(schema)
    return f"""
SELECT NULLIF({q.phone}, {q.owner}) AS phone, {q.lid} AS lid
FROM {q.message} m
WHERE m."instanceId" = {q.instance_id} AND m."key"->>'id' = $2
ORDER BY (NULLIF({q.phone}, {q.owner}) IS NULL), m."messageTimestamp" DESC
LIMIT 1
"""  # noqa: S608 - identifiers are validated (quote_ident), values are parameters


class EvolutionReader:
    """Read-only queries on Evolution's database; one asyncpg pool."""

    def __init__(
        self, pool: asyncpg.Pool[Any], schema: str, where: str, *, pooler: bool = False
    ) -> None:
        self._pool = pool
        self.pooler = pooler
        self.schema = schema
        self._where = where
        self._contacts_sql = contacts_sql(schema)
        self._dialog_sql = dialog_sql(schema)
        self._lid_sql = lid_phone_sql(schema)
        self._message_contact_sql = message_contact_sql(schema)
        self._unpaired_sql = unpaired_lids_sql(schema)
        self._skipped = sorted(SKIPPED_TYPES)
        self._not_names = list(_NOT_A_NAME)

    @classmethod
    async def connect(
        cls,
        dsn: str,
        schema: str = "auto",
        *,
        pooler: bool = False,
        min_size: int = 1,
        max_size: int = READER_POOL_SIZE,
        connect_timeout: float = 10.0,
        command_timeout: float | None = 300.0,
    ) -> EvolutionReader:
        """Open the pool and resolve `schema` ("auto": the URL's `?schema=`, else
        `evolution_api` when it holds "Message", else `public`). Raises
        EvolutionUnavailableError when unreachable.

        `dsn` may be Evolution's own DATABASE_CONNECTION_URI (`?schema=…`, Prisma's
        `pgbouncer=true`). Through a transaction pooler (`pooler`, `pgbouncer=true`, or
        detected when the pooler refuses the startup settings) no statement is cached
        and every read runs in its own read-only transaction.
        """
        url = parse_database_url(dsn)
        dsn, pooler = url.dsn, pooler or url.pooler
        if schema == "auto" and url.schema is not None:
            schema = url.schema
        if schema != "auto":
            quote_ident(schema)  # validates
        where = describe_dsn(dsn)
        options: dict[str, Any] = {
            "min_size": min_size,
            "max_size": max_size,
            "timeout": connect_timeout,
            "command_timeout": command_timeout,
            "init": _init_connection,
        }
        try:
            try:
                pool = await _create_pool(dsn, options, pooler=pooler)
            except asyncpg.PostgresError as exc:
                if pooler or "startup parameter" not in str(exc):
                    raise
                # PgBouncer and its kind accept no server settings at start-up.
                logger.info("evolution database is behind a pooler", where=where)
                pooler = True
                pool = await _create_pool(dsn, options, pooler=True)
        except _CONNECT_ERRORS as exc:
            raise EvolutionUnavailableError(
                f"cannot reach Evolution database at {where}: {_reason(exc)}"
            ) from None
        try:
            resolved = await _resolve_schema(pool, schema)
        except _CONNECTION_ERRORS as exc:
            await pool.close()
            raise EvolutionUnavailableError(
                f"cannot reach Evolution database at {where}: {_reason(exc)}"
            ) from None
        logger.info("evolution database connected", where=where, schema=resolved)
        return cls(pool, resolved, where, pooler=pooler)

    async def close(self) -> None:
        await self._pool.close()

    async def ping(self) -> None:
        """Raise EvolutionUnavailableError unless the database answers."""
        await self._fetchval("SELECT 1")

    async def instance_exists(self, name: str) -> bool:
        table = f'{quote_ident(self.schema)}."Instance"'
        sql = f"SELECT EXISTS (SELECT 1 FROM {table} WHERE name = $1)"  # noqa: S608
        found = await self._fetchval(sql, name)
        return bool(found)

    async def instance_token(self, name: str) -> str | None:
        """The instance's API key ("Instance".token), which Evolution sends as the webhook
        body's `apikey` when AUTHENTICATION_EXPOSE_IN_FETCH_INSTANCES is on."""
        table = f'{quote_ident(self.schema)}."Instance"'
        sql = f"SELECT token FROM {table} WHERE name = $1 LIMIT 1"  # noqa: S608
        token: str | None = await self._fetchval(sql, name)
        return token

    # -- contacts ---------------------------------------------------------------------
    async def contacts(
        self,
        instance: str,
        *,
        min_incoming: int,
        limit: int | None = None,
        since: datetime | None = None,
    ) -> list[ContactSummary]:
        """The instance's contacts with at least `min_incoming` incoming messages, newest
        last message first. `since`: only contacts with a message at or after it."""
        args = self._contact_args(instance, min_incoming, limit, since)
        try:
            async with self._pool.acquire() as conn, conn.transaction(readonly=True):
                await self._prepare_aggregate(conn)
                rows = await conn.fetch(self._contacts_sql, *args)
        except _CONNECTION_ERRORS as exc:
            raise self._unavailable(exc) from None
        return [_summary(row) for row in rows]

    async def iter_contacts(
        self,
        instance: str,
        *,
        min_incoming: int,
        limit: int | None = None,
        since: datetime | None = None,
        page_size: int = _PAGE_SIZE,
    ) -> AsyncGenerator[ContactSummary, None]:
        """`contacts()` as a stream: memory stays flat however many contacts there are.

        The aggregate runs once as `COPY (…) TO STDOUT`, spooled to a local temporary file,
        then read back `page_size` rows at a time. COPY runs with parallel workers (a
        cursor gets none: the same aggregate took about 1.5x as long through one), and
        the statement ends before the caller sees the first contact, so no snapshot stays
        open on Evolution's busy database while the caller works through the contacts.
        Through a transaction pooler this works as well: it is one statement.
        """
        args = self._contact_args(instance, min_incoming, limit, since)
        with tempfile.TemporaryFile() as spool:
            try:
                async with self._pool.acquire() as conn, conn.transaction(readonly=True):
                    await self._prepare_aggregate(conn)
                    await conn.copy_from_query(self._contacts_sql, *args, output=spool)
            except _CONNECTION_ERRORS as exc:
                raise self._unavailable(exc) from None
            spool.seek(0)
            while lines := spool.readlines(max(1, int(page_size)) * 64):
                for line in lines:
                    yield _summary_from_copy(line)

    @staticmethod
    async def _prepare_aggregate(conn: PoolConnectionProxy[Any]) -> None:
        await conn.execute(
            f"SET LOCAL work_mem = '{_AGGREGATE_WORK_MEM}';"
            f" SET LOCAL max_parallel_workers_per_gather = {_AGGREGATE_WORKERS};"
            " SET LOCAL jit = off"
        )

    def _contact_args(
        self, instance: str, min_incoming: int, limit: int | None, since: datetime | None
    ) -> tuple[Any, ...]:
        if limit is not None and limit < 0:
            raise ValueError("limit must not be negative")
        # "messageTimestamp" is a 32-bit integer column: keep the bound inside it.
        since_unix = None if since is None else min(int(_aware(since).timestamp()), 2**31 - 1)
        return (instance, self._skipped, min_incoming, since_unix, limit, self._not_names)

    # -- dialog -----------------------------------------------------------------------
    async def dialog(
        self, instance: str, phone: str, *, limit: int, excluded: AbstractSet[str] = frozenset()
    ) -> Dialog | None:
        """The contact's newest `limit` messages, oldest first, with counts and first/last
        times over its whole history; None when it has no messages. `excluded`: ids of
        messages known deleted from events, left out like those the DB marks deleted."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        digits = phone_digits(phone) if "@" in phone else normalize_phone(phone)
        if not digits:
            return None
        jid = digits + PHONE_SUFFIX
        try:
            rows = await self._read(
                "fetch",
                self._dialog_sql,
                instance,
                self._skipped,
                jid,
                limit,
                self._not_names,
                sorted(excluded),
            )
        except _CONNECTION_ERRORS as exc:
            raise self._unavailable(exc) from None
        if not rows or not rows[0]["incoming"] + rows[0]["outgoing"]:
            return None
        head = rows[0]
        messages: list[DialogMessage] = []
        for row in rows:
            if row["kid"] is None:
                continue
            text = message_text(row["message"], row["type"])
            if text is None:
                continue
            messages.append(
                DialogMessage(
                    id=row["kid"],
                    from_me=row["fm"],
                    timestamp=from_unix(row["ts"]),
                    text=text,
                    type=row["type"],
                )
            )
        return Dialog(
            instance=instance,
            contact=Contact(phone=digits, remote_jid=jid, name=head["name"]),
            messages=messages,
            incoming_count=head["incoming"],
            outgoing_count=head["outgoing"],
            first_message_at=from_unix(head["first_ts"]),
            last_message_at=from_unix(head["last_ts"]),
        )

    # -- identity -----------------------------------------------------------------------
    async def phone_for_lid(self, instance: str, lid: str) -> str | None:
        """The phone JID seen with this LID in the instance's stored messages (never the
        business's own number), or None when no message paired them yet."""
        return await self._fetchval(self._lid_sql, instance, lid)  # type: ignore[no-any-return]

    async def unpaired_lid_chats(self, instance: str) -> int:
        """LID-only chats that no stored message pairs with a phone (not in `contacts`)."""
        count: int = await self._fetchval(self._unpaired_sql, instance, self._skipped)
        return count

    async def contact_of_message(self, instance: str, message_id: str) -> str | None:
        """The contact's phone JID of a stored message, found by its WhatsApp id (as
        Evolution itself finds the message an update refers to); None when unknown."""
        row = await self._fetchrow(self._message_contact_sql, instance, message_id)
        if row is None:
            return None
        if row["phone"] is not None:
            return str(row["phone"])
        return None if row["lid"] is None else await self.phone_for_lid(instance, row["lid"])

    # -- helpers ----------------------------------------------------------------------
    async def _read(self, method: str, sql: str, *args: Any) -> Any:
        """One read. Through a pooler: in a read-only transaction (the session settings
        of a direct connection cannot be set there), else on the pool directly."""
        if not self.pooler:
            return await getattr(self._pool, method)(sql, *args)
        async with self._pool.acquire() as conn, conn.transaction(readonly=True):
            await conn.execute(_POOLED_SETTINGS)
            return await getattr(conn, method)(sql, *args)

    async def _fetchrow(self, sql: str, *args: Any) -> Any:
        try:
            return await self._read("fetchrow", sql, *args)
        except _CONNECTION_ERRORS as exc:
            raise self._unavailable(exc) from None

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        try:
            return await self._read("fetchval", sql, *args)
        except _CONNECTION_ERRORS as exc:
            raise self._unavailable(exc) from None

    def _unavailable(self, exc: BaseException) -> EvolutionUnavailableError:
        return EvolutionUnavailableError(
            f"cannot reach Evolution database at {self._where}: {_reason(exc)}"
        )


# Server settings of the reader's connections. Direct: sent at start-up. Through a
# transaction pooler (which refuses them at start-up and shares server connections):
# set per transaction instead.
_SESSION_SETTINGS = {
    "default_transaction_read_only": "on",
    # JIT compilation costs seconds on the contacts aggregate and saves nothing on these
    # short expressions.
    "jit": "off",
    # Planning the dialog query (long identity expressions matched against the expression
    # indexes) costs more than running it: plan once per connection.
    "plan_cache_mode": "force_generic_plan",
    # Parallel workers cost ~20 ms to start, ten times a dialog read; only the contacts
    # aggregate turns them on.
    "max_parallel_workers_per_gather": "0",
}
_POOLED_SETTINGS = "SET LOCAL jit = off; SET LOCAL max_parallel_workers_per_gather = 0"


async def _create_pool(dsn: str, options: dict[str, Any], *, pooler: bool) -> asyncpg.Pool[Any]:
    if pooler:
        # No prepared-statement cache: a transaction pooler hands each transaction to
        # any server connection, where a cached statement does not exist.
        return await asyncpg.create_pool(
            dsn,
            statement_cache_size=0,
            server_settings={"application_name": "crm-backend"},
            reset=keep_session,
            **options,
        )
    return await asyncpg.create_pool(
        dsn,
        server_settings={"application_name": "crm-backend", **_SESSION_SETTINGS},
        reset=keep_session,
        **options,
    )


async def _init_connection(conn: asyncpg.Connection[Any]) -> None:
    # Message bodies are decoded only for the few rows of a dialog; msgspec is fast and
    # tolerant of the odd shapes Evolution stores.
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=lambda value: msgspec.json.encode(value).decode(),
        decoder=msgspec.json.decode,
        format="text",
    )


async def _resolve_schema(pool: asyncpg.Pool[Any], schema: str) -> str:
    if schema != "auto":
        return schema
    found = await pool.fetchval('SELECT to_regclass(\'"evolution_api"."Message"\') IS NOT NULL')
    return "evolution_api" if found else "public"


def _summary(row: Mapping[str, Any]) -> ContactSummary:
    jid: str = row["phone"]
    return ContactSummary(
        contact=Contact(phone=phone_digits(jid), remote_jid=jid, name=row["name"]),
        incoming_count=row["incoming"],
        outgoing_count=row["outgoing"],
        first_message_at=from_unix(row["first_ts"]),
        last_message_at=from_unix(row["last_ts"]),
        last_message_id=row["last_id"],
    )


# COPY's text format: tab-separated, \\N for NULL, backslash escapes in values.
_COPY_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
_COPY_ESCAPE = re.compile(r"\\(.)")


def _copy_text(field: str) -> str | None:
    if field == "\\N":
        return None
    if "\\" not in field:
        return field
    return _COPY_ESCAPE.sub(lambda m: _COPY_ESCAPES.get(m.group(1), m.group(1)), field)


def _summary_from_copy(line: bytes) -> ContactSummary:
    """One row of `contacts_sql` as COPY's text format writes it."""
    phone, incoming, outgoing, first_ts, last_ts, last_id, name = (
        line.decode().removesuffix("\n").split("\t")
    )
    return _summary(
        {
            "phone": _copy_text(phone),
            "incoming": int(incoming),
            "outgoing": int(outgoing),
            "first_ts": int(first_ts),
            "last_ts": int(last_ts),
            "last_id": _copy_text(last_id),
            "name": _copy_text(name),
        }
    )


def _aware(moment: datetime) -> datetime:
    """Naive datetimes are taken as UTC (as Evolution's own timestamps are)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
