"""Typed settings read from the environment and an optional `.env` file.

Every variable of the contract lives here, in one msgspec Struct. A bad value raises
`ConfigError` with one line naming the variable and what it expects; the CLI turns that
into exit code 2.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import msgspec

from service.amqp_urls import node_urls


class ConfigError(Exception):
    """A configuration value is missing or malformed; the message names the variable."""


class DatabaseUrl(msgspec.Struct, frozen=True, kw_only=True):
    """A PostgreSQL URL as Evolution's users write it, split for asyncpg."""

    dsn: str  # what asyncpg accepts (Prisma-only parameters removed)
    schema: str | None  # Prisma's `?schema=` (Evolution's DATABASE_CONNECTION_URI)
    pooler: bool  # `?pgbouncer=true`: a transaction pooler sits in front


# Query parameters of Prisma connection URLs that PostgreSQL does not know (asyncpg would
# send them as server settings, which the server refuses at connect).
_PRISMA_PARAMS = frozenset(
    {
        "schema",
        "pgbouncer",
        "connection_limit",
        "pool_timeout",
        "socket_timeout",
        "statement_cache_size",
        "sslaccept",
        "sslidentity",
        "sslpassword",
    }
)


def parse_database_url(url: str) -> DatabaseUrl:
    """Split Evolution's `DATABASE_CONNECTION_URI` form (`…/evolution?schema=evolution_api`,
    maybe `&pgbouncer=true`) into an asyncpg DSN, the schema and the pooler flag."""
    parts = urlsplit(url)
    if not parts.query:
        return DatabaseUrl(dsn=url, schema=None, pooler=False)
    kept: list[tuple[str, str]] = []
    schema: str | None = None
    pooler = False
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "schema":
            schema = value or None
        elif name == "pgbouncer":
            pooler = value.lower() in ("true", "1", "yes")
        elif name not in _PRISMA_PARAMS:
            kept.append((name, value))
    if schema is not None and not _IDENT.fullmatch(schema):
        raise ConfigError("EVOLUTION_DATABASE_URL: ?schema= must be a plain schema name")
    dsn = urlunsplit(parts._replace(query=urlencode(kept)))
    return DatabaseUrl(dsn=dsn, schema=schema, pooler=pooler)


class Settings(msgspec.Struct, kw_only=True, frozen=True):
    host: str = "0.0.0.0"
    port: int = msgspec.field(default=8084)

    evolution_database_url: str = ""
    evolution_db_host: str = "localhost"
    evolution_db_port: int = 5432
    evolution_db_name: str = "evolution"
    evolution_db_user: str = "postgres"
    evolution_db_password: str = ""
    evolution_db_schema: str = "auto"

    supabase_url: str | None = None
    supabase_service_key: str | None = None
    results_database_url: str = "postgresql:///crm"

    # One node, or a cluster: `amqp://u:p@h1,h2,h3/` or comma-separated URLs.
    amqp_url: str = "amqp://guest:guest@localhost:5672/"
    # Prefix of every exchange and queue this service declares (several deployments can
    # share one broker).
    amqp_prefix: str = "crm"
    # Number of contact shards (one single-active-consumer queue each): the most
    # `consume` processes that share the work. Changing it declares new queues; move
    # what the old ones hold with `crm-backend topology migrate --from-shards OLD`.
    queue_shards: int = 32
    # Shards this process consumes ("" = all; e.g. "0-3,6"). Each shard queue has a single
    # active consumer, so overlapping assignments stay safe (the others are standbys).
    consumer_shards: str = ""
    # Unacknowledged deliveries a consumer may hold (debounced events wait unacked).
    consumer_prefetch: int = 256
    # Longest a busy contact's events may wait for a quiet moment before analysis anyway.
    debounce_max_seconds: float = 60.0
    # Optional: also consume Evolution's own RabbitMQ exchange (topic, routing key = event).
    evolution_amqp_exchange: str | None = None
    # Delivery attempts of an event before it goes to the dead-letter queue.
    max_attempts: int = 5
    # Delay before the n-th retry (seconds, comma separated; the last repeats).
    retry_delays: str = "5,30,120,300"
    # Lead events (outbox, drained by consume processes): how long a claimed batch is
    # reserved for its process (a process killed meanwhile leaves it to the others after
    # this), and the pause between drains while the outbox is empty.
    outbox_lease_seconds: float = 30.0
    outbox_poll_seconds: float = 0.5

    analyzer: Literal["auto", "openai", "rules"] = "auto"
    openai_api_key: str | None = None
    openai_base_url: str | None = None
    # gpt-5-mini shuts down on 2026-12-11; OpenAI names gpt-6.1-terra its replacement.
    openai_model: str = "gpt-6.1-terra"
    # Sent only to servers that accept it ("" = never sent); low keeps hidden reasoning
    # tokens (billed as output) small for a short extraction.
    openai_reasoning_effort: Literal[
        "", "none", "minimal", "low", "medium", "high", "xhigh", "max"
    ] = "low"
    # Longest answer, reasoning included: bounds the cost and time of one call.
    openai_max_completion_tokens: int = 4000
    # Longest one analysis may take, every call and retry included.
    openai_analysis_timeout: float = 180.0
    # Where the instructions go: `system`, or `user` (folded into the user message, for
    # servers whose chat template drops system messages); `auto` asks a llama.cpp server.
    openai_system_message: Literal["auto", "system", "user"] = "auto"
    openai_timeout: float = 60.0
    openai_max_retries: int = 4
    # Characters of dialog text sent to the model (newest kept): bounds tokens per call.
    max_dialog_chars: int = 12000

    api_token: str | None = None
    webhook_token: str | None = None
    webhook_jwt_secret: str | None = None
    auth_disabled: bool = False
    # Supabase Auth access tokens on the REST API: HS256 with the project's JWT secret, or
    # asymmetric keys from the project's JWKS; the account is read from the claim named here
    # (dotted path), else looked up from the `sub` user's instances.
    supabase_jwt_secret: str | None = None
    supabase_jwks_url: str | None = None
    supabase_account_claim: str = "app_metadata.user_account_id"
    supabase_jwt_audience: str = "authenticated"
    # Key of the contact hash in logs (HMAC): without it a hash is reversed by trying phones.
    contact_hash_secret: str | None = None
    # Compare the webhook body's `apikey` with the instance's token in Evolution's DB.
    webhook_verify_instance_apikey: bool = False
    # Event timestamps later than now + this are clamped to the time of receipt.
    max_clock_skew_seconds: int = 300
    # HTTP server limits: seconds to send the request head, seconds per body read, open
    # connections, seconds a CSV chunk may wait on a client, parallel CSV exports.
    http_header_timeout: float = 15.0
    http_body_timeout: float = 60.0
    http_max_connections: int = 512
    export_send_timeout: float = 30.0
    export_max_concurrent: int = 4
    # Evolution sends media inline as base64 when `base64` is on: size for that.
    webhook_max_body_bytes: int = 64 * 1024 * 1024

    min_incoming: int = 3
    debounce_seconds: float = 10.0
    analysis_concurrency: int = 8
    max_dialog_messages: int = 200
    # Characters of one message, and of one dialog (newest kept), any analyzer sees; the
    # longest an analysis may take before it counts as failed.
    max_message_chars: int = 4096
    analysis_max_chars: int = 100_000
    analysis_timeout: float = 120.0

    # Outbound webhooks (`crm-backend notify`): deliveries in flight per process, and per
    # endpoint (a slow endpoint holds no more slots than this), seconds per attempt,
    # attempts before the dead-letter queue, delays of the retry tiers (seconds; the n-th
    # failure waits the n-th, the last repeats; a `Retry-After` picks a later one, capped
    # at the last).
    notify_concurrency: int = 32
    notify_endpoint_concurrency: int = 8
    notify_timeout: float = 15.0
    notify_max_attempts: int = 8
    notify_retry_delays: str = "5,30,120,600,1800,3600"
    # Targets in production: hosts an endpoint may name ("" = any; `*.example.com` matches
    # subdomains), and refusing addresses in private, loopback and link-local ranges
    # (checked on every connect, after DNS).
    notify_allowed_hosts: str = ""
    notify_deny_private: bool = False

    log_level: Literal["TRACE", "DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "pretty"] = "json"

    def __post_init__(self) -> None:
        _check_range("PORT", self.port, 1, 65535)
        _check_range("EVOLUTION_DB_PORT", self.evolution_db_port, 1, 65535)
        _check_range("MIN_INCOMING", self.min_incoming, 1, 10_000)
        _check_range("ANALYSIS_CONCURRENCY", self.analysis_concurrency, 1, 1024)
        _check_range("MAX_DIALOG_MESSAGES", self.max_dialog_messages, 1, 100_000)
        _check_range("MAX_DIALOG_CHARS", self.max_dialog_chars, 200, 10_000_000)
        _check_range("QUEUE_SHARDS", self.queue_shards, 1, 1024)
        _check_range("MAX_ATTEMPTS", self.max_attempts, 1, 100)
        _check_range("CONSUMER_PREFETCH", self.consumer_prefetch, 1, 65535)
        try:
            self.consumer_shard_list()
        except ValueError as exc:
            raise ConfigError(
                f"CONSUMER_SHARDS must list shard numbers below QUEUE_SHARDS, e.g. 0-3,6 ({exc})"
            ) from None
        _check_range("OPENAI_MAX_RETRIES", self.openai_max_retries, 0, 20)
        _check_range("WEBHOOK_MAX_BODY_BYTES", self.webhook_max_body_bytes, 1024, 2**31)
        if not 1 <= self.outbox_lease_seconds <= 3600:
            raise ConfigError("OUTBOX_LEASE_SECONDS must be a number of seconds from 1 to 3600")
        if not 0.01 <= self.outbox_poll_seconds <= 60:
            raise ConfigError("OUTBOX_POLL_SECONDS must be a number of seconds from 0.01 to 60")
        if not 0 <= self.debounce_seconds <= 3600:
            raise ConfigError("DEBOUNCE_SECONDS must be a number of seconds from 0 to 3600")
        if not 0 < self.openai_timeout <= 3600:
            raise ConfigError("OPENAI_TIMEOUT must be a number of seconds from 0 to 3600")
        if not 0 < self.openai_analysis_timeout <= 3600:
            raise ConfigError("OPENAI_ANALYSIS_TIMEOUT must be a number of seconds from 0 to 3600")
        _check_range(
            "OPENAI_MAX_COMPLETION_TOKENS", self.openai_max_completion_tokens, 16, 1_000_000
        )
        if self.evolution_db_schema != "auto" and not _IDENT.fullmatch(self.evolution_db_schema):
            raise ConfigError("EVOLUTION_DB_SCHEMA must be 'auto' or a plain schema name")
        if not _IDENT.fullmatch(self.amqp_prefix.replace(".", "_").replace("-", "_")):
            raise ConfigError("AMQP_PREFIX must be letters, digits, '.', '-' or '_'")
        if bool(self.supabase_url) != bool(self.supabase_service_key):
            raise ConfigError("SUPABASE_URL and SUPABASE_SERVICE_KEY must be set together")
        if self.supabase_url and not self.supabase_url.startswith(("http://", "https://")):
            raise ConfigError("SUPABASE_URL must be an http(s) URL such as https://xyz.supabase.co")
        try:
            self.amqp_node_urls()
        except ValueError as exc:
            raise ConfigError(f"AMQP_URL {exc}") from None
        for name, url in (
            ("RESULTS_DATABASE_URL", self.results_database_url),
            ("EVOLUTION_DATABASE_URL", self.evolution_database_url),
        ):
            if url and not url.startswith(("postgresql://", "postgres://")):
                raise ConfigError(f"{name} must be a postgresql:// URL")
        _check_range("MAX_MESSAGE_CHARS", self.max_message_chars, 100, 1_000_000)
        _check_range("ANALYSIS_MAX_CHARS", self.analysis_max_chars, 1000, 10_000_000)
        _check_range("MAX_CLOCK_SKEW_SECONDS", self.max_clock_skew_seconds, 0, 86_400)
        _check_range("HTTP_MAX_CONNECTIONS", self.http_max_connections, 1, 1_000_000)
        _check_range("EXPORT_MAX_CONCURRENT", self.export_max_concurrent, 1, 1000)
        for name, seconds in (
            ("HTTP_HEADER_TIMEOUT", self.http_header_timeout),
            ("HTTP_BODY_TIMEOUT", self.http_body_timeout),
            ("EXPORT_SEND_TIMEOUT", self.export_send_timeout),
            ("ANALYSIS_TIMEOUT", self.analysis_timeout),
        ):
            if not 0 < seconds <= 3600:
                raise ConfigError(f"{name} must be a number of seconds from 0 to 3600")
        for name, url in (
            ("RESULTS_DATABASE_URL", self.results_database_url),
            ("EVOLUTION_DATABASE_URL", self.evolution_database_url),
        ):
            _check_url_port(name, url)
        if not self.auth_disabled:
            for name, secret in self.secrets().items():
                _check_secret(name, secret)
        if self.evolution_database_url:
            parse_database_url(self.evolution_database_url)  # validates ?schema=
        if self.analyzer == "openai" and not self.openai_api_key:
            raise ConfigError("ANALYZER=openai needs OPENAI_API_KEY")
        for name, text in (
            ("RETRY_DELAYS", self.retry_delays),
            ("NOTIFY_RETRY_DELAYS", self.notify_retry_delays),
        ):
            try:
                _delays(text)
            except ValueError:
                raise ConfigError(
                    f"{name} must be positive seconds separated by commas, e.g. 5,30,120"
                ) from None
        _check_range("NOTIFY_CONCURRENCY", self.notify_concurrency, 1, 10_000)
        _check_range("NOTIFY_ENDPOINT_CONCURRENCY", self.notify_endpoint_concurrency, 1, 10_000)
        _check_range("NOTIFY_MAX_ATTEMPTS", self.notify_max_attempts, 1, 100)
        if not 0 < self.notify_timeout <= 300:
            raise ConfigError("NOTIFY_TIMEOUT must be a number of seconds from 0 to 300")

    # -- derived values -------------------------------------------------------------
    def evolution_url(self) -> DatabaseUrl:
        """Evolution's database: the DSN, the schema to read (EVOLUTION_DB_SCHEMA, else
        the URL's `?schema=`, else "auto") and whether a transaction pooler is in front."""
        parsed = parse_database_url(self.evolution_dsn_raw())
        schema = self.evolution_db_schema
        if schema == "auto" and parsed.schema is not None:
            schema = parsed.schema
        return msgspec.structs.replace(parsed, schema=schema)

    def evolution_dsn(self) -> str:
        """An asyncpg DSN of Evolution's database (Prisma-only URL parameters removed)."""
        return parse_database_url(self.evolution_dsn_raw()).dsn

    def evolution_dsn_raw(self) -> str:
        if self.evolution_database_url:
            return self.evolution_database_url
        auth = quote(self.evolution_db_user, safe="")
        if self.evolution_db_password:
            auth += ":" + quote(self.evolution_db_password, safe="")
        return (
            f"postgresql://{auth}@{self.evolution_db_host}:{self.evolution_db_port}/"
            f"{quote(self.evolution_db_name, safe='')}"
        )

    def analyzer_kind(self) -> Literal["openai", "rules"]:
        if self.analyzer == "auto":
            return "openai" if self.openai_api_key else "rules"
        return self.analyzer

    def uses_supabase(self) -> bool:
        return bool(self.supabase_url and self.supabase_service_key)

    def retry_delay_list(self) -> list[float]:
        return _delays(self.retry_delays)

    def notify_retry_delay_list(self) -> list[float]:
        return sorted(_delays(self.notify_retry_delays))

    def notify_allowed_host_list(self) -> list[str]:
        return [h.strip().lower() for h in self.notify_allowed_hosts.split(",") if h.strip()]

    def amqp_node_urls(self) -> list[str]:
        return node_urls(self.amqp_url)

    def consumer_shard_list(self) -> list[int]:
        if not self.consumer_shards.strip():
            return list(range(self.queue_shards))
        shards: set[int] = set()
        for part in self.consumer_shards.split(","):
            low, _, high = part.strip().partition("-")
            first, last = int(low), int(high or low)
            if not 0 <= first <= last < self.queue_shards:
                raise ValueError(f"{part.strip()!r} is out of range")
            shards.update(range(first, last + 1))
        return sorted(shards)

    def secrets(self) -> dict[str, str]:
        """The shared secrets that are set, by variable name (never logged)."""
        values = {
            "API_TOKEN": self.api_token,
            "WEBHOOK_TOKEN": self.webhook_token,
            "WEBHOOK_JWT_SECRET": self.webhook_jwt_secret,
            "SUPABASE_JWT_SECRET": self.supabase_jwt_secret,
            "CONTACT_HASH_SECRET": self.contact_hash_secret,
        }
        return {name: value for name, value in values.items() if value}

    def webhook_auth_configured(self) -> bool:
        return bool(self.webhook_token or self.webhook_jwt_secret)


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _delays(text: str) -> list[float]:
    delays = [float(part) for part in text.split(",") if part.strip()]
    if not delays or any(d <= 0 for d in delays):
        raise ValueError("bad retry delays")
    return delays


# What each field expects, in the words a user reads in the error line.
_EXPECT = {
    int: "a whole number",
    float: "a number",
    bool: "true or false",
    str: "text",
}


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{name} must be a whole number from {low} to {high}, got {value}")


MIN_SECRET_CHARS = 32
# The values .env.example ships with: a copied example file must not become a live secret.
PLACEHOLDER_SECRETS = frozenset({"change-me-long-random-string", "change-me-too", "change-me"})


def _check_secret(name: str, value: str) -> None:
    # The message names the variable, never the value.
    if value.strip().lower() in PLACEHOLDER_SECRETS or value.lower().startswith("change-me"):
        raise ConfigError(
            f"{name} is still the .env.example placeholder: set a random secret "
            "(e.g. `openssl rand -hex 32`)"
        )
    if len(value) < MIN_SECRET_CHARS:
        raise ConfigError(
            f"{name} must be at least {MIN_SECRET_CHARS} characters long, got {len(value)} "
            "(e.g. `openssl rand -hex 32`; AUTH_DISABLED=true only for a local trial)"
        )


def _check_url_port(name: str, url: str) -> None:
    """A port outside 1-65535 is a one-line error here, not a traceback at connect time."""
    if not url:
        return
    netloc = urlsplit(url).netloc.rpartition("@")[2]
    for host in netloc.split(","):
        port = host.rpartition("]")[2].rpartition(":")[2] if ":" in host else ""
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ConfigError(f"{name} has a bad port {port[:20]!r}: expected 1 to 65535")


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse KEY=VALUE lines (optional quotes, `export`, comments); no interpolation."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def load_settings(
    environ: Mapping[str, str] | None = None, dotenv: Path | None = Path(".env")
) -> Settings:
    """Settings from `.env` overlaid by the process environment (the environment wins)."""
    env = dict(os.environ if environ is None else environ)
    merged: dict[str, str] = read_dotenv(dotenv) if dotenv is not None else {}
    merged.update(env)
    fields = {f.name: f for f in msgspec.structs.fields(Settings)}
    raw: dict[str, object] = {}
    for name in fields:
        value = merged.get(name.upper())
        if value is None or value == "":
            continue
        raw[name] = value
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(exc, fields, raw)) from None


def _explain(
    exc: msgspec.ValidationError,
    fields: Mapping[str, msgspec.structs.FieldInfo],
    raw: Mapping[str, object],
) -> str:
    text = str(exc)
    match = re.search(r"at `\$\.(\w+)`", text)
    if not match:
        return text
    name = match.group(1)
    field = fields.get(name)
    expected = "a valid value"
    if field is not None:
        tp = field.type
        args = getattr(tp, "__args__", ())
        if getattr(tp, "__origin__", None) is Literal:
            expected = "one of " + ", ".join(str(a) for a in args)
        else:
            for kind, words in _EXPECT.items():
                if tp is kind or kind in args:
                    expected = words
                    break
    return f"{name.upper()} must be {expected}, got {raw.get(name)!r}"
