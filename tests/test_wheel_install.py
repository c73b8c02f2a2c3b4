"""`pip install` of the built wheel, outside the checkout, gives a working `crm-backend`.

The wheel is built from the checkout (`pip wheel --no-deps`), installed (not editable) with
its dependencies into a fresh virtualenv in a temporary directory (pip's cache makes the
dependencies cheap after the first run), and its `crm-backend` runs from another temporary
directory with a minimal environment: the SQL, demo data and Evolution schema it needs can
only come from the installed package.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.conftest import AMQP_URL, create_database, drop_database, pg_dsn
from tests.supabase_db import create_supabase_database, fetch, owner_dsn

ROOT = Path(__file__).parent.parent
# The migration files of the checkout: the installed wheel must carry and apply each one.
MIGRATIONS = sorted(p.stem for p in (ROOT / "service" / "sql").glob("[0-9][0-9][0-9][0-9]_*.sql"))
INSTALL_TIMEOUT = 600


class Installed:
    def __init__(self, venv: Path, workdir: Path) -> None:
        self.venv = venv
        self.workdir = workdir

    async def run(self, *args: str, **env: str) -> tuple[int, str, str]:
        """`crm-backend *args` from the install, in an empty directory, minimal env."""
        base = {"PATH": f"{self.venv / 'bin'}:/usr/bin:/bin", "HOME": str(self.workdir)}
        process = await asyncio.create_subprocess_exec(
            str(self.venv / "bin" / "crm-backend"),
            *args,
            cwd=self.workdir,
            env={**base, "LOG_LEVEL": "WARNING", **env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(180):
            out, err = await process.communicate()
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    root = tmp_path_factory.mktemp("wheel")
    dist, venv, workdir = root / "dist", root / "venv", root / "work"
    workdir.mkdir()
    quiet = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for command in (
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT)],
        [sys.executable, "-m", "venv", str(venv)],
    ):
        subprocess.run(command, check=True, env=quiet, timeout=INSTALL_TIMEOUT)
    (wheel,) = dist.glob("crm_backend-*.whl")
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(wheel)],
        check=True,
        env=quiet,
        timeout=INSTALL_TIMEOUT,
    )
    located = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import service; print(service.__file__)"],
        cwd=workdir,
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    # The package imported is the installed copy, not the checkout.
    assert located.stdout.startswith(str(venv)), located.stdout
    yield Installed(venv, workdir)


@pytest.fixture
async def owner_database() -> AsyncIterator[str]:
    name = await create_supabase_database("crmt_whl")
    try:
        yield owner_dsn(name)
    finally:
        await drop_database(name)


async def test_migrate_print_from_the_installed_wheel(installed: Installed) -> None:
    code, out, err = await installed.run("migrate", "--print")
    assert code == 0, err
    for version in MIGRATIONS:
        assert f"-- ==== {version} ====" in out
    assert "GRANT %s ON TABLE %I TO service_role" in out
    assert out.rstrip().endswith("NOTIFY pgrst, 'reload schema';")


async def test_migrate_from_the_installed_wheel(installed: Installed, owner_database: str) -> None:
    code, _, err = await installed.run("migrate", RESULTS_DATABASE_URL=owner_database)
    assert code == 0, err
    assert f"migrations applied: {', '.join(MIGRATIONS)}" in err
    code, _, err = await installed.run("migrate", RESULTS_DATABASE_URL=owner_database)
    assert code == 0 and "database is up to date" in err
    tables = await fetch(
        owner_database,
        "SELECT relname, relrowsecurity FROM pg_class "
        "WHERE relnamespace = 'public'::regnamespace AND relkind = 'r' ORDER BY 1",
    )
    # Every table the installed SQL made is there, and row level security is on for each.
    assert {"crm_schema_migrations", "dialog_analysis", "whatsapp_instances"} <= {
        t["relname"] for t in tables
    }
    assert [t["relname"] for t in tables if not t["relrowsecurity"]] == []


async def test_demo_and_evolution_index_from_the_installed_wheel(installed: Installed) -> None:
    from msgspec.structs import replace

    from service.config import load_settings
    from tests.harness import delete_topology

    name = await create_database("crmt_whl_demo")
    prefix = f"crmt.{secrets.token_hex(4)}"
    env = {"RESULTS_DATABASE_URL": pg_dsn(name), "AMQP_URL": AMQP_URL, "AMQP_PREFIX": prefix}
    try:
        code, out, err = await installed.run("demo", "--speed", "0", **env)
        assert code == 0, err
        assert "leads (" in out and "77012345601" in out
        # The demo's Evolution database holds the sample messages: the index SQL for it.
        evolution = pg_dsn("crm_demo_evolution")
        code, out, err = await installed.run("evolution-index", EVOLUTION_DATABASE_URL=evolution)
        assert code == 0, err
        assert 'CREATE INDEX CONCURRENTLY IF NOT EXISTS "crm_message_contact_idx"' in out
    finally:
        await drop_database(name)
        settings = load_settings({"AMQP_URL": AMQP_URL, "AMQP_PREFIX": prefix}, dotenv=None)
        await delete_topology(replace(settings, amqp_prefix=f"{prefix}.demo", queue_shards=4))
