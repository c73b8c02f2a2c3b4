"""`crm-backend backfill` end to end on the development dialogs (real PostgreSQL, real
openai client against an OpenAI-compatible test server)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from service.adapters.evolution.seed import load_dialogs
from tests.fakes.openai_server import FakeOpenAI

ROOT = Path(__file__).parent.parent


def _env(evolution_dsn: str, results_dsn: str, base_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME")}
    env.update(
        {
            "EVOLUTION_DATABASE_URL": evolution_dsn,
            "RESULTS_DATABASE_URL": results_dsn,
            "ANALYZER": "openai",
            "OPENAI_API_KEY": "sk-test",
            "OPENAI_BASE_URL": base_url,
            "LOG_LEVEL": "WARNING",
            "PYTHONPATH": str(ROOT),
        }
    )
    return env


async def run_cli(env: dict[str, str], *args: str, timeout: float = 120) -> tuple[int, str, str]:
    """`python -m service ARGS` as a user runs it: exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        *args,
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=timeout)
    return proc.returncode or 0, out.decode(), err.decode()


async def backfill(
    env: dict[str, str], *args: str, timeout: float = 120
) -> tuple[dict[str, Any], str]:
    code, out, err = await run_cli(env, "backfill", *args, timeout=timeout)
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


async def test_backfill_then_rerun_calls_nothing(
    evolution_dsn: str, results_dsn: str, dialogs: list[dict[str, Any]]
) -> None:
    account = uuid.uuid4()
    await load_dialogs(evolution_dsn, "dev", dialogs)
    over = [d for d in dialogs if sum(not m["from_me"] for m in d["messages"]) >= 3]
    async with FakeOpenAI() as fake:
        env = _env(evolution_dsn, results_dsn, fake.base_url)
        stats, err = await backfill(env, "--instance", "dev", "--account", str(account))
        assert stats["total"] == len(dialogs)
        assert stats["analyzed"] == len(over) == fake.calls
        assert stats["new_leads"] == len(dialogs) - len(over)
        assert stats["hot"] + stats["warm"] + stats["cold"] == stats["analyzed"]
        assert stats["errors"] == 0
        assert "contacts" in err and "ETA" in err  # the progress line

        # Rerun: every dialog unchanged, no analyzer call at all.
        again, _ = await backfill(env, "--instance", "dev", "--account", str(account))
        assert fake.calls == len(over)
        assert again["analyzed"] == 0 and again["errors"] == 0

        # --dry-run lists what would be analysed and estimates tokens, calling nothing.
        dry, dry_err = await backfill(
            env, "--instance", "dev", "--account", str(account), "--dry-run", "--force"
        )
        assert fake.calls == len(over)
        assert dry["would_analyze"] == len(over)
        assert dry["estimated_prompt_tokens"] > 1000
        assert dry["estimated_cost_usd"] is not None and dry["estimated_cost_usd"] > 0
        assert dry_err.count("would analyze") == len(over)

        # --force re-analyses; --max-dialogs caps the analyses.
        forced, _ = await backfill(
            env, "--instance", "dev", "--account", str(account), "--force", "--max-dialogs", "5"
        )
        assert forced["analyzed"] == 5 and fake.calls == len(over) + 5

    conn = await asyncpg.connect(results_dsn)
    try:
        rows = await conn.fetch(
            "SELECT contact_phone, funnel_stage, analyzer, score, user_account_id "
            "FROM dialog_analysis WHERE instance_name = 'dev'"
        )
    finally:
        await conn.close()
    assert len(rows) == len(dialogs)
    assert {r["user_account_id"] for r in rows} == {account}
    by_phone = {r["contact_phone"]: r for r in rows}
    for dialog in dialogs:
        row = by_phone[dialog["contact"]["phone"]]
        if dialog in over:
            assert row["analyzer"] == "openai"
        else:
            assert row["funnel_stage"] == "new_lead" and row["analyzer"] is None


async def test_backfill_since_and_max_contacts(
    evolution_dsn: str, results_dsn: str, dialogs: list[dict[str, Any]]
) -> None:
    await load_dialogs(evolution_dsn, "dev", dialogs)
    async with FakeOpenAI() as fake:
        env = _env(evolution_dsn, results_dsn, fake.base_url)
        account = str(uuid.uuid4())
        stats, _ = await backfill(
            env, "--instance", "dev", "--account", account, "--max-contacts", "7"
        )
        assert stats["total"] == 7
        future, _ = await backfill(
            env, "--instance", "dev", "--account", account, "--since", "2099-01-01"
        )
        assert future["total"] == 0


async def test_backfill_ctrl_c_keeps_finished_rows(
    evolution_dsn: str, results_dsn: str, dialogs: list[dict[str, Any]]
) -> None:
    await load_dialogs(evolution_dsn, "dev", dialogs)
    async with FakeOpenAI(latency=0.5) as fake:
        env = _env(evolution_dsn, results_dsn, fake.base_url)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service",
            "backfill",
            "--instance",
            "dev",
            "--account",
            str(uuid.uuid4()),
            "--concurrency",
            "2",
            env=env,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        while fake.calls < 4:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.6)
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
        assert proc.returncode == 130, err.decode()
        assert "Traceback" not in err.decode()
        stats = json.loads(out.decode().strip().splitlines()[-1])
        assert 0 < stats["analyzed"] < 30
    conn = await asyncpg.connect(results_dsn)
    try:
        analysed = await conn.fetchval(
            "SELECT count(*) FROM dialog_analysis WHERE analyzer IS NOT NULL"
        )
    finally:
        await conn.close()
    assert analysed == stats["analyzed"]


async def test_backfill_no_notify_records_history_but_no_events(
    evolution_dsn: str, results_dsn: str, dialogs: list[dict[str, Any]]
) -> None:
    """`backfill --no-notify` (a history replay) writes the history and no outbox row; the
    same backfill without it raises a lead.hot for each hot lead."""
    account = uuid.uuid4()
    await load_dialogs(evolution_dsn, "quiet", dialogs[:12])
    await load_dialogs(evolution_dsn, "loud", dialogs[:12])
    env = {**_env(evolution_dsn, results_dsn, "http://127.0.0.1:9"), "ANALYZER": "rules"}
    quiet, _ = await backfill(env, "--instance", "quiet", "--account", str(account), "--no-notify")
    loud, _ = await backfill(env, "--instance", "loud", "--account", str(account))
    assert quiet["hot"] == loud["hot"] > 0
    conn = await asyncpg.connect(results_dsn)
    try:
        counts = await conn.fetch(
            "SELECT d.instance_name, "
            "(SELECT count(*) FROM crm_lead_history h JOIN dialog_analysis x ON x.id = h.lead_id "
            " WHERE x.instance_name = d.instance_name) AS history, "
            "(SELECT count(*) FROM crm_outbox o WHERE o.body -> 'data' ->> 'instance' = "
            " d.instance_name AND o.event_type = 'lead.hot') AS hot "
            "FROM (SELECT DISTINCT instance_name FROM dialog_analysis) d ORDER BY 1"
        )
    finally:
        await conn.close()
    by_instance = {r["instance_name"]: (r["history"], r["hot"]) for r in counts}
    assert by_instance["quiet"][0] == by_instance["loud"][0] > 0  # the same history
    assert by_instance["quiet"][1] == 0
    assert by_instance["loud"][1] == loud["hot"]
