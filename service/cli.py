"""`crm-backend <command>`: the command line.

Every error a user can cause (configuration, unreachable service, bad flag, unknown
instance) ends in one line on stderr and exit code 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import uuid
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn

import msgspec

from service.config import ConfigError, Settings, load_settings
from service.logs import setup_logging

EXIT_USAGE = 2


class UserError(Exception):
    """An error the user can fix; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One clear line instead of argparse's usage block.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _uuid(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a UUID") from None


def _whole(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least `minimum`."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"{value!r} must be {minimum} or more")
        return number

    return parse


_positive = _whole(1)
_non_negative = _whole(0)


def _iso_date(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an ISO date such as 2026-09-01 or 2026-09-01T12:00:00Z"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="crm-backend", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = sub.add_parser("serve", help="HTTP server: webhooks, REST, health, metrics")
    serve.add_argument("--host")
    serve.add_argument("--port", type=_positive)
    sub.add_parser("consume", help="RabbitMQ consumer: per-contact re-analysis")
    run = sub.add_parser("run", help="serve and consume in one process")
    run.add_argument("--host")
    run.add_argument("--port", type=_positive)

    backfill = sub.add_parser("backfill", help="analyse an instance's contacts in bulk")
    backfill.add_argument("--instance", required=True)
    backfill.add_argument("--account", type=_uuid, help="account UUID (default: the mapped one)")
    backfill.add_argument("--min-incoming", type=_non_negative)
    backfill.add_argument("--max-contacts", type=_positive)
    backfill.add_argument("--max-dialogs", type=_positive)
    backfill.add_argument("--concurrency", type=_positive)
    backfill.add_argument("--since", type=_iso_date)
    backfill.add_argument("--dry-run", action="store_true")
    backfill.add_argument("--force", action="store_true", help="re-analyse unchanged dialogs")

    migrate = sub.add_parser("migrate", help="create or upgrade the results tables")
    migrate.add_argument("--print", action="store_true", help="print the SQL instead")

    instances = sub.add_parser("instances", help="map Evolution instances to accounts")
    isub = instances.add_subparsers(dest="action", required=True, parser_class=_Parser)
    add = isub.add_parser("add")
    add.add_argument("name")
    add.add_argument("--account", type=_uuid, required=True)
    isub.add_parser("list")
    remove = isub.add_parser("remove")
    remove.add_argument("name")

    dlq = sub.add_parser("dlq", help="inspect and re-queue dead-lettered events")
    dsub = dlq.add_subparsers(dest="action", required=True, parser_class=_Parser)
    dlist = dsub.add_parser("list")
    dlist.add_argument("--limit", type=_positive, default=50)
    replay = dsub.add_parser("replay")
    replay.add_argument("--limit", type=_positive)

    topology = sub.add_parser("topology", help="RabbitMQ queue layout")
    tsub = topology.add_subparsers(dest="action", required=True, parser_class=_Parser)
    tmigrate = tsub.add_parser(
        "migrate", help="move the events of an older queue layout into the current one"
    )
    tmigrate.add_argument(
        "--from-shards", type=_positive, help="the QUEUE_SHARDS the old shard queues had"
    )

    index = sub.add_parser(
        "evolution-index", help="print (or --apply) the index for fast per-contact reads"
    )
    index.add_argument("--apply", action="store_true")

    demo = sub.add_parser("demo", help="replay the sample dialogs through the whole service")
    demo.add_argument("--speed", type=float, default=0.005, help="seconds between messages")

    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        if getattr(args, "host", None):
            settings = msgspec.structs.replace(settings, host=args.host)
        if getattr(args, "port", None):
            settings = msgspec.structs.replace(settings, port=args.port)
    except ConfigError as exc:
        _fail(f"configuration: {exc}")
    setup_logging(settings)
    command: Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]] = _COMMANDS[
        args.command
    ]
    try:
        code: int = asyncio.run(command(settings, args))
    except KeyboardInterrupt:
        code = 130
    except (UserError, ConfigError) as exc:
        _fail(str(exc))
    except Exception as exc:
        message = describe_error(exc)
        if message is None:
            raise
        _fail(message)
    sys.exit(code)


def _fail(message: str) -> NoReturn:
    print(f"crm-backend: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def describe_error(exc: BaseException) -> str | None:
    """One line for the errors a user meets (unreachable services, wrong credentials)."""
    from service.errors import explain

    return explain(exc)


# -- commands ---------------------------------------------------------------------------


async def _cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from service.migrations import apply_migrations, migration_sql

    if args.print:
        sys.stdout.write(migration_sql())
        return 0
    if settings.uses_supabase() and settings.results_database_url == "postgresql:///crm":
        raise UserError(
            "with SUPABASE_URL set, run `crm-backend migrate --print` and paste the SQL into "
            "Supabase's SQL editor (or set RESULTS_DATABASE_URL to the project's connection "
            "string to migrate directly)"
        )
    applied = await apply_migrations(settings.results_database_url)
    print(
        f"migrations applied: {', '.join(applied)}" if applied else "database is up to date",
        file=sys.stderr,
    )
    return 0


async def _cmd_instances(settings: Settings, args: argparse.Namespace) -> int:
    from service.stores.factory import open_store

    store = await open_store(settings)
    try:
        if args.action == "add":
            mapping = await store.add_instance(args.name, args.account)
            print(f"{mapping.instance_name} -> {mapping.user_account_id}")
        elif args.action == "list":
            for item in await store.list_instances():
                print(f"{item.instance_name}\t{item.user_account_id}")
        else:
            if not await store.remove_instance(args.name):
                raise UserError(f"instance {args.name!r} is not mapped")
            print(f"removed {args.name}")
    finally:
        await store.close()
    return 0


async def _cmd_index(settings: Settings, args: argparse.Namespace) -> int:
    from service.evolution.index import apply_index, index_sql
    from service.evolution.reader import EvolutionReader

    url = settings.evolution_url()
    reader = await EvolutionReader.connect(url.dsn, url.schema or "auto", pooler=url.pooler)
    schema = reader.schema
    await reader.close()
    if not args.apply:
        print(index_sql(schema))
        return 0
    created = await apply_index(settings.evolution_dsn(), schema)
    print("index created" if created else "index already present", file=sys.stderr)
    return 0


async def _cmd_dlq(settings: Settings, args: argparse.Namespace) -> int:
    from consumers.dlq import list_dead, replay_dead

    if args.action == "list":
        depth, letters = await list_dead(settings, args.limit)
        print(f"{depth} message(s) in the dead-letter queue", file=sys.stderr)
        for letter in letters:
            print(msgspec.json.encode(letter).decode())
        return 0
    result = await replay_dead(settings, args.limit)
    print(msgspec.json.encode(result).decode())
    return 0


async def _cmd_topology(settings: Settings, args: argparse.Namespace) -> int:
    from service.broker.migrate import migrate_topology

    try:
        report = await migrate_topology(settings, args.from_shards)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    print(msgspec.json.encode(report).decode())
    if not report.complete:
        print(
            "some old queues still hold messages (a consumer of the old version holds "
            "them?): stop it and run this again",
            file=sys.stderr,
        )
        return 1
    return 0


async def _cmd_backfill(settings: Settings, args: argparse.Namespace) -> int:
    from service.app import app_context
    from service.backfill import BackfillOptions, BackfillStats, dry_run, run_backfill
    from service.progress import Progress

    async with app_context(settings, analyzer=not args.dry_run) as ctx:
        reader = ctx.reader
        store = ctx.require_store()
        assert reader is not None
        if not await reader.instance_exists(args.instance):
            raise UserError(f"unknown instance {args.instance!r}: no such Evolution instance")
        account = args.account or await store.instance_account(args.instance)
        if account is None:
            raise UserError(
                f"instance {args.instance!r} is not mapped to an account: pass --account or run "
                f"`crm-backend instances add {args.instance} --account <uuid>`"
            )
        mapped = await store.instance_account(args.instance)
        if mapped is not None and mapped != account:
            raise UserError(f"instance {args.instance!r} belongs to another account")
        options = BackfillOptions(
            instance=args.instance,
            account=account,
            min_incoming=settings.min_incoming if args.min_incoming is None else args.min_incoming,
            max_contacts=args.max_contacts,
            max_dialogs=args.max_dialogs,
            concurrency=args.concurrency or settings.analysis_concurrency,
            since=args.since,
            force=args.force,
        )
        if args.dry_run:
            from service.analyzers.prompt import estimate_tokens

            async def unchanged(summary: Any) -> bool:
                state = await store.get_state(account, args.instance, summary.contact.phone)
                return state is not None and state.last_message_id == summary.last_message_id

            estimate = await dry_run(
                reader,
                options,
                lambda dialog: estimate_tokens(dialog, settings),
                unchanged,
                settings.max_dialog_messages,
                settings.openai_model if settings.analyzer_kind() == "openai" else None,
                lambda line: print(line, file=sys.stderr),
            )
            print(msgspec.json.encode(estimate).decode())
            return 0

        pipeline = ctx.require_pipeline()
        progress = Progress(sys.stderr)
        stats = BackfillStats()
        task = asyncio.create_task(
            run_backfill(pipeline, reader, options, progress.update, stats=stats)
        )
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGINT, task.cancel)
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
        interrupted = False
        try:
            await task
        except asyncio.CancelledError:
            interrupted = True
        progress.update(stats)
        progress.finish()
        out = msgspec.to_builtins(stats)
        out.pop("skipped", None)
        print(msgspec.json.encode(out).decode())
        return 130 if interrupted else 0


def _require_rest_auth(settings: Settings) -> None:
    if not settings.api_token and not settings.auth_disabled:
        raise UserError(
            "API_TOKEN is not set: the REST API refuses to start without it "
            "(set AUTH_DISABLED=true only for a local trial)"
        )
    from service.webhook_auth import check_webhook_auth_config

    check_webhook_auth_config(settings)


async def _serve_until_stopped(settings: Settings, *, consume: bool, serve: bool) -> int:
    from service.app import app_context

    if serve:
        _require_rest_auth(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    bridge_on = consume and bool(settings.evolution_amqp_exchange)
    async with app_context(settings, publisher=serve or bridge_on) as ctx:
        workers: list[Any] = []  # consumers; started in the background
        starting: list[asyncio.Task[None]] = []
        failures: list[BaseException] = []
        runner = None

        def watch(task: asyncio.Task[None]) -> None:
            # A consumer that cannot start (e.g. conflicting queue arguments) stops the
            # process with its error instead of leaving it up without consuming.
            if not task.cancelled() and task.exception() is not None and not stop.is_set():
                failures.append(task.exception())  # type: ignore[arg-type]
                stop.set()

        try:
            # HTTP first: with the broker down, intake still answers (503, so Evolution
            # retries) and /health, /ready tell what is wrong, while consumers keep
            # trying to connect.
            if serve:
                from aiohttp import web

                from handlers.app import make_app

                runner = web.AppRunner(make_app(ctx), access_log=None, handle_signals=False)
                await runner.setup()
                site = web.TCPSite(runner, settings.host, settings.port)
                await site.start()
                from loguru import logger

                logger.info("listening on http://{}:{}", settings.host, settings.port)
            if consume:
                from consumers.contacts import ContactConsumer

                workers.append(ContactConsumer(ctx))
            if bridge_on:
                from consumers.evolution_bridge import EvolutionBridge

                workers.append(EvolutionBridge(ctx))
            starting = [asyncio.create_task(worker.start(stop)) for worker in workers]
            for task in starting:
                task.add_done_callback(watch)
            await stop.wait()
        finally:
            for task in starting:
                task.cancel()
            await asyncio.gather(*starting, return_exceptions=True)
            for worker in reversed(workers):
                await worker.stop()
            if runner is not None:
                await runner.cleanup()
    if failures:
        raise failures[0]
    return 0


async def _cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    return await _serve_until_stopped(settings, consume=False, serve=True)


async def _cmd_consume(settings: Settings, args: argparse.Namespace) -> int:
    return await _serve_until_stopped(settings, consume=True, serve=False)


async def _cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    return await _serve_until_stopped(settings, consume=True, serve=True)


async def _cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from service.demo import run_demo

    # The lead table is the output here; per-contact log lines would bury it.
    if settings.log_level in ("INFO", "TRACE"):
        settings = msgspec.structs.replace(settings, log_level="WARNING")
        setup_logging(settings)
    await run_demo(settings, speed=max(0.0, args.speed))
    return 0


_COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]]] = {
    "serve": _cmd_serve,
    "consume": _cmd_consume,
    "run": _cmd_run,
    "backfill": _cmd_backfill,
    "migrate": _cmd_migrate,
    "instances": _cmd_instances,
    "dlq": _cmd_dlq,
    "topology": _cmd_topology,
    "evolution-index": _cmd_index,
    "demo": _cmd_demo,
}
