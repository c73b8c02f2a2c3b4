"""Every error a user can cause at the command line: one clear line, exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
AMQP_OK = "amqp://guest:guest@127.0.0.1:5672/"
CLOSED = "127.0.0.1:5999"  # nothing listens here


def cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "LANG")}
    base.update(env)
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=cwd,
        env={**base, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("crm-backend")
    assert "error:" in lines[0]
    return lines[0]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """An empty directory: no .env is read."""
    return tmp_path


def test_bad_flag(workdir: Path) -> None:
    line = one_error_line(cli("backfill", "--instance", "x", "--concurrency", "zero", cwd=workdir))
    assert "--concurrency" in line and "'zero' is not a whole number" in line


def test_unknown_command(workdir: Path) -> None:
    line = one_error_line(cli("frobnicate", cwd=workdir))
    assert "frobnicate" in line


def test_bad_uuid_flag(workdir: Path) -> None:
    line = one_error_line(cli("instances", "add", "x", "--account", "nope", cwd=workdir))
    assert "'nope' is not a UUID" in line


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"PORT": "abc"}, "PORT must be a whole number, got 'abc'"),
        ({"ANALYZER": "gpt"}, "ANALYZER must be one of auto, openai, rules"),
        ({"DEBOUNCE_SECONDS": "-1"}, "DEBOUNCE_SECONDS must be a number of seconds"),
        ({"AMQP_URL": "http://x"}, "AMQP_URL must be an amqp:// or amqps:// URL"),
        ({"SUPABASE_URL": "https://x.supabase.co"}, "SUPABASE_URL and SUPABASE_SERVICE_KEY"),
        ({"ANALYZER": "openai"}, "ANALYZER=openai needs OPENAI_API_KEY"),
        ({"AUTH_DISABLED": "maybe"}, "AUTH_DISABLED must be true or false"),
    ],
)
def test_bad_configuration(workdir: Path, env: dict[str, str], expected: str) -> None:
    line = one_error_line(cli("migrate", "--print", cwd=workdir, **env))
    assert expected in line


def test_bad_value_in_dotenv_file(workdir: Path) -> None:
    (workdir / ".env").write_text("MIN_INCOMING=three\n")
    line = one_error_line(cli("migrate", "--print", cwd=workdir))
    assert "MIN_INCOMING must be a whole number, got 'three'" in line


def test_missing_database(workdir: Path) -> None:
    dsn = "postgresql://postgres@127.0.0.1:5432/crm_no_such_db"
    line = one_error_line(cli("migrate", cwd=workdir, RESULTS_DATABASE_URL=dsn))
    assert 'database "crm_no_such_db" does not exist' in line
    assert "RESULTS_DATABASE_URL" in line


def test_unknown_database_user(workdir: Path) -> None:
    dsn = "postgresql://nobody:secret-pw@127.0.0.1:5432/postgres"
    line = one_error_line(cli("instances", "list", cwd=workdir, RESULTS_DATABASE_URL=dsn))
    assert 'role "nobody" does not exist' in line
    assert "secret-pw" not in line


def test_database_down(workdir: Path) -> None:
    dsn = f"postgresql://postgres@{CLOSED}/crm"
    line = one_error_line(cli("migrate", cwd=workdir, RESULTS_DATABASE_URL=dsn))
    assert "cannot connect to the results database" in line and "5999" in line


def test_broker_down(workdir: Path) -> None:
    line = one_error_line(cli("dlq", "list", cwd=workdir, AMQP_URL=f"amqp://guest:guest@{CLOSED}/"))
    assert "RabbitMQ" in line and "AMQP_URL" in line


def test_serve_without_api_token(workdir: Path) -> None:
    line = one_error_line(cli("serve", cwd=workdir, WEBHOOK_TOKEN="w" * 40))
    assert "API_TOKEN is not set" in line


def test_serve_without_webhook_auth(workdir: Path) -> None:
    line = one_error_line(cli("serve", cwd=workdir, API_TOKEN="a" * 40))
    assert "WEBHOOK_TOKEN" in line


async def test_backfill_unknown_instance(
    workdir: Path, evolution_dsn: str, results_dsn: str
) -> None:
    line = one_error_line(
        cli(
            "backfill",
            "--instance",
            "no-such-instance",
            "--account",
            str(uuid.uuid4()),
            cwd=workdir,
            EVOLUTION_DATABASE_URL=evolution_dsn,
            RESULTS_DATABASE_URL=results_dsn,
        )
    )
    assert "unknown instance 'no-such-instance'" in line


async def test_backfill_unmapped_instance(
    workdir: Path, evolution_dsn: str, results_dsn: str
) -> None:
    from service.adapters.evolution.seed import create_instance

    await create_instance(evolution_dsn, "lonely")
    line = one_error_line(
        cli(
            "backfill",
            "--instance",
            "lonely",
            cwd=workdir,
            EVOLUTION_DATABASE_URL=evolution_dsn,
            RESULTS_DATABASE_URL=results_dsn,
        )
    )
    assert "not mapped to an account" in line and "instances add lonely" in line


def test_evolution_database_down(workdir: Path) -> None:
    line = one_error_line(
        cli(
            "evolution-index",
            cwd=workdir,
            EVOLUTION_DATABASE_URL=f"postgresql://postgres@{CLOSED}/evolution",
        )
    )
    assert "Evolution" in line and "5999" in line


def test_migrate_through_the_transaction_pooler_is_refused(workdir: Path) -> None:
    line = one_error_line(
        cli("migrate", cwd=workdir, RESULTS_DATABASE_URL="postgresql://u@127.0.0.1:6543/postgres")
    )
    assert "session pooler (port 5432)" in line and "transaction pooler" in line


def test_a_missing_file_is_not_called_a_connection_failure() -> None:
    from service.adapters.failures import cli_line as explain
    from service.adapters.stores.migrations import PackageDataError

    line = explain(FileNotFoundError(2, "No such file or directory", "/x/0001.sql"))
    assert line is not None and "cannot connect" not in line and "/x/0001.sql" in line
    assert explain(PackageDataError("no SQL migrations")) == "no SQL migrations"
    assert explain(ConnectionRefusedError(111, "refused")) == "cannot connect: [Errno 111] refused"
