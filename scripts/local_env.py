"""First-run setup for `make run` / `make demo` on local services.

Writes `.env` (once) with generated API_TOKEN, WEBHOOK_TOKEN, CONTACT_HASH_SECRET and local URLs, makes sure
the local `crm` and `evolution` databases exist (an empty Evolution-shaped one when there is
none, so the service starts before a real Evolution is connected), and prints what to use.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.config import ConfigError, load_settings, read_dotenv  # noqa: E402

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"

TEMPLATE = """\
# Written by `make run` on first start; edit freely. Every variable: see .env.example.
API_TOKEN={api_token}
WEBHOOK_TOKEN={webhook_token}
CONTACT_HASH_SECRET={contact_hash_secret}
RESULTS_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/crm
EVOLUTION_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/evolution
AMQP_URL=amqp://guest:guest@127.0.0.1:5672/
LOG_FORMAT=pretty
"""


async def ensure_database(name: str) -> bool:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{name}"')
        return not exists
    finally:
        await conn.close()


async def main() -> None:
    env_path = ROOT / ".env"
    if not env_path.exists():
        env_path.write_text(
            TEMPLATE.format(
                api_token=secrets.token_urlsafe(32),
                webhook_token=secrets.token_urlsafe(32),
                contact_hash_secret=secrets.token_urlsafe(32),
            )
        )
        env_path.chmod(0o600)
        print("wrote .env with new API_TOKEN and WEBHOOK_TOKEN", file=sys.stderr)
    try:
        settings = load_settings(dotenv=env_path)
    except ConfigError as exc:
        sys.exit(f"crm-backend: error: configuration: {exc}")
    values = read_dotenv(env_path)
    if "127.0.0.1" in settings.results_database_url:
        await ensure_database(settings.results_database_url.rsplit("/", 1)[-1])
    if "127.0.0.1" in settings.evolution_dsn() and await ensure_database(
        settings.evolution_dsn().rsplit("/", 1)[-1]
    ):
        from service.adapters.evolution.seed import create_schema

        await create_schema(settings.evolution_dsn())
        print("created an empty local Evolution database", file=sys.stderr)
    base = f"http://localhost:{settings.port}"
    print(
        f"""
crm-backend on {base}
  health:   curl {base}/health
  REST:     curl -H 'Authorization: Bearer {values.get("API_TOKEN", settings.api_token)}' \\
                 '{base}/dialogs/analysis?userAccountId=<uuid>'
  webhook:  {base}/webhooks/evolution?token={values.get("WEBHOOK_TOKEN", settings.webhook_token)}
  metrics:  {base}/metrics   docs: {base}/docs
""",
        file=sys.stderr,
    )


if __name__ == "__main__":
    asyncio.run(main())
