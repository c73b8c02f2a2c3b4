"""The contacts aggregate as it was first written: the reference the faster query in
`service.adapters.evolution.reader` is compared with (tests/test_contacts_aggregate.py).

It de-duplicates every message with one sort (DISTINCT ON contact and WhatsApp id), then
sorts again newest first and aggregates per contact: simple to read, slow on millions of
messages. Same parameters and result columns as `contacts_sql`.
"""

from __future__ import annotations

from service.adapters.evolution.identity import LID_SUFFIX, PHONE_SUFFIX, phone_jid_sql_from
from service.adapters.evolution.reader import _push_sql, _Sql


def oracle_contacts_sql(schema: str) -> str:
    """The contacts aggregate. Parameters: $1 instance name, $2 skipped types,
    $3 min incoming, $4 since (unix seconds or NULL), $5 limit (or NULL), $6 names that
    are not names."""
    q = _Sql(schema)
    live = q.live
    lid = (
        f"CASE WHEN s.rj LIKE '%{LID_SUFFIX}' THEN s.rj"
        f" WHEN s.k->>'remoteJidAlt' LIKE '%{LID_SUFFIX}' THEN s.k->>'remoteJidAlt' END"
    )
    # The phone JID (never the business's own number); a LID-only chat is grouped under
    # its LID and mapped to a phone below.
    who = f"COALESCE(NULLIF({phone_jid_sql_from('s.rj', 's.k')}, s.owner), {lid})"
    return f"""
WITH dedup AS (
    -- One row per stored WhatsApp message: a message stored twice (an edit rewrites one
    -- copy and its timestamp) counts once, as its newest copy.
    SELECT DISTINCT ON (w.who, w.kid) w.who, w.ts, w.kid, w.fm, w.push, w.lid
    FROM (
        SELECT {who} COLLATE "C" AS who, s.ts, s.kid, s.fm, s.push, {lid} AS lid
        FROM (
            SELECT m."key" AS k, m."key"->>'remoteJid' AS rj, m."messageTimestamp" AS ts,
                COALESCE(m."key"->>'id', m.id) COLLATE "C" AS kid,
                COALESCE(m."key"->>'fromMe' = 'true', false) AS fm, {_push_sql("m")} AS push,
                o.owner
            FROM {q.message} m, (SELECT {q.owner} AS owner) o
            WHERE m."instanceId" = {q.instance_id} AND {live} AND {q.not_deleted()}
        ) s
    ) w
    WHERE w.who IS NOT NULL
    ORDER BY w.who, w.kid, w.ts DESC
), msgs AS (
    -- Newest first within each contact.
    SELECT * FROM dedup ORDER BY who, ts DESC, kid DESC
), per_jid AS (
    -- Input is newest first within each contact, so an array's first element is the
    -- newest value (cheaper than a window or a sort per group).
    SELECT who,
        count(*) FILTER (WHERE NOT fm) AS incoming,
        count(*) FILTER (WHERE fm) AS outgoing,
        min(ts) AS first_ts, max(ts) AS last_ts,
        (array_agg(kid))[1] AS last_id,
        (array_agg(push) FILTER (WHERE NOT fm AND push <> ALL($6::text[])))[1] AS name,
        max(ts) FILTER (WHERE NOT fm AND push <> ALL($6::text[])) AS name_ts,
        max(lid) AS lid
    FROM msgs
    GROUP BY who
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
        (array_agg(p.last_id ORDER BY p.last_ts DESC, p.last_id DESC))[1] AS last_id,
        (array_agg(p.name ORDER BY p.name_ts DESC) FILTER (WHERE p.name IS NOT NULL))[1]
            AS name
    FROM per_jid p LEFT JOIN lidmap l ON l.lid = p.who
    GROUP BY 1
)
SELECT phone, incoming, outgoing, first_ts, last_ts, last_id, name
FROM per_contact
WHERE phone LIKE '%{PHONE_SUFFIX}' AND incoming >= $3 AND ($4::int IS NULL OR last_ts >= $4)
ORDER BY last_ts DESC, phone DESC
LIMIT $5
"""  # identifiers are validated (quote_ident), values are parameters
