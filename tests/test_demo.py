"""`crm-backend demo` end to end on the real services: webhooks in, lead table out."""

from __future__ import annotations

import io
import json
import secrets
from pathlib import Path

import pytest

from service.cli.demo import DEMO_ACCOUNT, _with_database, run_demo, webhook_bodies
from service.config import load_settings
from tests.conftest import drop_database
from tests.harness import delete_topology

ROOT = Path(__file__).parent.parent


async def test_demo_prints_every_lead(results_dsn: str, amqp_prefix: str) -> None:
    dialogs = json.loads((ROOT / "service" / "demo_data" / "dialogs.json").read_text())
    settings = load_settings(
        {
            "RESULTS_DATABASE_URL": results_dsn,
            "AMQP_URL": "amqp://guest:guest@127.0.0.1:5672/",
            "AMQP_PREFIX": amqp_prefix,
            "LOG_LEVEL": "WARNING",
        },
        dotenv=None,
    )
    evolution_db = f"crmt_demo_{secrets.token_hex(4)}"
    out = io.StringIO()
    try:
        rows = await run_demo(settings, out=out, speed=0.0, evolution_db=evolution_db)
    finally:
        await drop_database(evolution_db)
        from msgspec.structs import replace

        await delete_topology(replace(settings, amqp_prefix=f"{amqp_prefix}.demo", queue_shards=4))
    text = out.getvalue()
    # One row per sample contact, every one current with its newest message.
    assert len(rows) == len(dialogs)
    assert {r.contact_phone for r in rows} == {d["contact"]["phone"] for d in dialogs}
    last_ids = {}
    for body in webhook_bodies(dialogs, "demo"):
        last_ids[body["data"]["key"]["remoteJid"].split("@")[0]] = body["data"]["key"]["id"]
    assert all(r.last_message_id == last_ids[r.contact_phone] for r in rows)
    assert all(r.user_account_id == DEMO_ACCOUNT for r in rows)
    # Contacts under the threshold stay new_lead without analysis; the rest were analysed.
    for dialog in dialogs:
        row = next(r for r in rows if r.contact_phone == dialog["contact"]["phone"])
        incoming = sum(1 for m in dialog["messages"] if not m["from_me"])
        if incoming < 3:
            assert row.funnel_stage == "new_lead" and row.analyzer is None
        else:
            assert row.analyzer == "rules"
    # The table and the pointers a newcomer needs.
    assert "contact" in text and "interest" in text and "score" in text
    assert "77012345601" in text
    assert f"userAccountId={DEMO_ACCOUNT}" in text and "/metrics" in text
    hot = sum(1 for r in rows if r.interest_level == "hot")
    assert f"{len(rows)} leads ({hot} hot" in text


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        ("postgresql:///crm", "postgresql:///crm_demo"),
        (
            "postgresql://u:p@db:5432/crm?sslmode=require",
            "postgresql://u:p@db:5432/crm_demo?sslmode=require",
        ),
        ("postgres://127.0.0.1/crm", "postgres://127.0.0.1/crm_demo"),
    ],
)
def test_demo_database_keeps_the_server_form(server: str, expected: str) -> None:
    # A socket DSN without a host must stay a socket DSN, not turn into host "crm_demo".
    assert _with_database(server, "crm_demo") == expected
