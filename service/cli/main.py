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
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import msgspec

from service.config import ConfigError, Settings, load_settings
from service.logs import setup_logging

if TYPE_CHECKING:  # the commands import what they use when run: `--help` stays fast
    from service.adapters.stores.base import ResultsStore
    from service.bootstrap.builders import ReadParts
    from service.usecases.backfill import BackfillOptions

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
    backfill.add_argument(
        "--workers",
        type=_positive,
        default=1,
        help="processes sharing the run (and its --concurrency); one process is bound by "
        "its own CPU near 150 analyses/s",
    )
    backfill.add_argument("--since", type=_iso_date)
    backfill.add_argument("--dry-run", action="store_true")
    backfill.add_argument("--force", action="store_true", help="re-analyse unchanged dialogs")
    backfill.add_argument(
        "--no-notify",
        dest="notify",
        action="store_false",
        help="record the leads' history but raise no lead.hot / lead.stage_changed events "
        "(default: notify; the events are published by the consume processes)",
    )

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
    move = isub.add_parser("move", help="map an instance to another account, with its leads")
    move.add_argument("name")
    move.add_argument("--account", type=_uuid, required=True)

    keys = sub.add_parser("keys", help="API keys bound to one account")
    ksub = keys.add_subparsers(dest="action", required=True, parser_class=_Parser)
    kcreate = ksub.add_parser("create", help="make a key (printed once, stored hashed)")
    kcreate.add_argument("--account", type=_uuid, required=True)
    kcreate.add_argument("--name")
    ksub.add_parser("list")
    krevoke = ksub.add_parser("revoke", help="revoke a key by its prefix or id")
    krevoke.add_argument("key")

    notify = sub.add_parser("notify", help="outbound webhooks: endpoints per account")
    nsub = notify.add_subparsers(dest="action", required=True, parser_class=_Parser)
    nadd = nsub.add_parser(
        "add", help="add an endpoint; prints its id and signing secret (shown only now)"
    )
    nadd.add_argument("url", help="http(s) URL the events are POSTed to")
    nadd.add_argument("--account", type=_uuid, required=True)
    nadd.add_argument(
        "--events",
        help="comma-separated: lead.hot,lead.stage_changed (default: every event)",
    )
    nlist = nsub.add_parser("list", help="endpoints (secrets shortened)")
    nlist.add_argument("--account", type=_uuid)
    nremove = nsub.add_parser("remove", help="remove an endpoint; its pending deliveries drop")
    nremove.add_argument("id", type=_uuid)

    dlq = sub.add_parser(
        "dlq", help="inspect and re-queue dead-lettered events and webhook deliveries"
    )
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

    ev = sub.add_parser(
        "eval", help="measure an analyzer/model against ground truth (writes nothing)"
    )
    truth = ev.add_mutually_exclusive_group(required=True)
    truth.add_argument("--labels", metavar="FILE", help="labeled dialogs (dialogs.json format)")
    truth.add_argument(
        "--from-edits",
        action="store_true",
        help="leads whose stage/niche/owner/budget were set by hand, on their current dialogs",
    )
    ev.add_argument("--instance", help="with --from-edits: the Evolution instance")
    ev.add_argument(
        "--account", type=_uuid, help="with --from-edits: the account (default: mapped)"
    )
    ev.add_argument("--analyzer", choices=["rules", "openai"], help="default: ANALYZER")
    ev.add_argument("--model", help="default: OPENAI_MODEL")
    ev.add_argument("--max-dialogs", type=_positive)
    ev.add_argument("--max-cost", type=float, default=1.0, help="USD; stop above it (default 1)")
    ev.add_argument("--concurrency", type=_positive, default=4)
    ev.add_argument("--json", action="store_true", help="the report as JSON on stdout")
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
    from service.adapters.failures import cli_line

    return cli_line(exc)


# -- commands ---------------------------------------------------------------------------


async def _cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from service.adapters.stores.migrations import apply_migrations, migration_sql

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
    async with _store(settings) as store:
        if args.action == "add":
            mapping = await store.add_instance(args.name, args.account)
            print(f"{mapping.instance_name} -> {mapping.user_account_id}")
            foreign = await store.foreign_leads(args.name, args.account)
            if foreign:
                # Their rows stay the other account's, and analyses for this one skip them.
                print(
                    f"warning: {foreign} lead(s) of {args.name} belong to another account and "
                    f"will not be updated; `crm-backend instances move {args.name} --account "
                    f"{args.account}` moves them",
                    file=sys.stderr,
                )
        elif args.action == "move":
            moved = await store.move_instance(args.name, args.account)
            print(
                f"{moved.instance_name} -> {moved.user_account_id} "
                f"(was {moved.previous_account_id or 'unmapped'}; {moved.moved} lead(s) moved)"
            )
        elif args.action == "list":
            for item in await store.list_instances():
                print(f"{item.instance_name}\t{item.user_account_id}")
        else:
            if not await store.remove_instance(args.name):
                raise UserError(f"instance {args.name!r} is not mapped")
            print(f"removed {args.name}")
    return 0


async def _cmd_keys(settings: Settings, args: argparse.Namespace) -> int:
    from service.usecases.api_keys import create_key

    async with _store(settings) as store:
        if args.action == "create":
            key, record = await create_key(store, args.account, args.name)
            print(key)
            print(
                f"key {record.prefix}… for account {record.user_account_id} created; it is "
                "shown only now",
                file=sys.stderr,
            )
        elif args.action == "list":
            for item in await store.list_api_keys():
                state = f"revoked {item.revoked_at:%Y-%m-%d}" if item.revoked_at else "active"
                print(
                    f"{item.prefix}\t{item.user_account_id}\t{item.name or ''}\t{state}\t{item.id}"
                )
        else:
            if not await store.revoke_api_key(
                args.key[:12] if args.key.startswith("crm_") else args.key
            ):
                raise UserError(f"no active API key {args.key[:12]!r}")
            print(f"revoked {args.key[:12]}")
    return 0


@contextlib.asynccontextmanager
async def _store(settings: Settings) -> AsyncIterator[ResultsStore]:
    from service.adapters.stores.factory import open_store

    store = await open_store(settings)
    try:
        yield store
    finally:
        await store.close()


async def _cmd_notify(settings: Settings, args: argparse.Namespace) -> int:
    from service.adapters.stores.webhooks import webhook_store
    from service.adapters.webhooks_out.targets import TargetPolicy
    from service.domain.webhooks import masked_secret, redact_url
    from service.usecases.webhook_endpoints import (
        EndpointError,
        add_endpoint,
        list_endpoints,
        remove_endpoint,
    )

    async with _store(settings) as store:
        endpoints = webhook_store(store)
        if args.action == "add":
            try:
                endpoint = await add_endpoint(
                    endpoints,
                    TargetPolicy.from_settings(settings),
                    args.account,
                    args.url,
                    args.events,
                )
            except EndpointError as exc:
                raise UserError(f"cannot add {args.url!r}: {exc}") from None
            print(endpoint.id)
            print(endpoint.secret)
            print(
                f"endpoint {endpoint.id} for account {endpoint.account} added "
                f"({', '.join(endpoint.events) if endpoint.events else 'every event'}); "
                "verify deliveries with the secret above, shown only now",
                file=sys.stderr,
            )
        elif args.action == "list":
            for item in await list_endpoints(endpoints, args.account):
                events = ",".join(item.events) if item.events else "*"
                print(
                    f"{item.id}\t{item.account}\t{redact_url(item.url)}\t{events}\t"
                    f"{masked_secret(item.secret)}\t{item.created_at:%Y-%m-%d}"
                )
        else:
            if not await remove_endpoint(endpoints, args.id):
                raise UserError(f"no webhook endpoint {args.id}")
            print(f"removed {args.id}")
    return 0


async def _cmd_index(settings: Settings, args: argparse.Namespace) -> int:
    from service.adapters.evolution.index import apply_index, index_sql
    from service.adapters.evolution.reader import EvolutionReader

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
    from service.adapters.broker.dead_letters import list_dead, replay_dead

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
    from service.adapters.broker.migrate import migrate_topology

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
    from service.adapters.analyzers.prompt import estimate_tokens
    from service.bootstrap.builders import BackfillParts, backfill_parts, read_parts
    from service.cli.progress import Progress
    from service.usecases.backfill import BackfillStats, dry_run, run_backfill

    if args.dry_run:
        async with read_parts(settings) as parts:
            reader, store = parts.reader, parts.store
            options = await _backfill_options(parts, settings, args)
            estimate = await dry_run(
                reader,
                options,
                lambda dialog: estimate_tokens(dialog, settings),
                store,
                settings.max_dialog_messages,
                settings.openai_model if settings.analyzer_kind() == "openai" else None,
                lambda line: print(line, file=sys.stderr),
            )
            print(msgspec.json.encode(estimate).decode())
            return 0

    parts_of = read_parts if args.workers > 1 else backfill_parts
    async with parts_of(settings) as ctx:
        reader = ctx.reader
        options = await _backfill_options(ctx, settings, args)
        progress = Progress(sys.stderr)
        stats = BackfillStats.zero()
        if isinstance(ctx, BackfillParts):
            run = run_backfill(ctx.pipeline, reader, options, progress.update, stats=stats)
        else:
            from service.usecases.backfill_workers import run_backfill_workers

            run = run_backfill_workers(
                settings,
                reader,
                options,
                args.workers,
                backfill_parts,
                progress.update,
                stats=stats,
            )
        task = asyncio.create_task(run)
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


async def _backfill_options(
    parts: ReadParts, settings: Settings, args: argparse.Namespace
) -> BackfillOptions:
    from service.usecases.backfill import BackfillOptions

    reader, store = parts.reader, parts.store
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
    return BackfillOptions(
        instance=args.instance,
        account=account,
        min_incoming=settings.min_incoming if args.min_incoming is None else args.min_incoming,
        max_contacts=args.max_contacts,
        max_dialogs=args.max_dialogs,
        concurrency=args.concurrency or settings.analysis_concurrency,
        since=args.since,
        force=args.force,
        notify=args.notify,
    )


def _require_rest_auth(settings: Settings) -> None:
    if settings.auth_disabled:
        from loguru import logger

        logger.warning(
            "AUTH_DISABLED=true: the REST API answers every request without a credential, "
            "for every account{}; webhooks {}",
            " (API_TOKEN is set but not checked)" if settings.api_token else "",
            "still need WEBHOOK_TOKEN / WEBHOOK_JWT_SECRET"
            if settings.webhook_auth_configured()
            else "are open to anyone",
        )
    if not settings.api_token and not settings.auth_disabled:
        raise UserError(
            "API_TOKEN is not set: the REST API refuses to start without it "
            "(set AUTH_DISABLED=true only for a local trial)"
        )
    from service.usecases.webhook_auth import check_webhook_auth_config

    check_webhook_auth_config(settings)


async def _serve_until_stopped(settings: Settings, *, consume: bool, serve: bool) -> int:
    from service.bootstrap.builders import app_context

    if serve:
        _require_rest_auth(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    bridge_on = consume and bool(settings.evolution_amqp_exchange)
    async with app_context(settings, lifecycle=True, warm=consume) as ctx:
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
                from handlers.http_app import make_app
                from handlers.server import start_site

                runner = await start_site(make_app(ctx), settings)
                from loguru import logger

                logger.info("listening on http://{}:{}", settings.host, settings.port)
            if consume:
                from consumers.contacts import ContactConsumer
                from consumers.outbox import OutboxDrainer
                from consumers.webhooks import WebhookWorkers
                from service.adapters.stores.webhooks import webhook_store

                workers.append(ContactConsumer(ctx))
                # Lead events stored by every process (serve and backfill too) are
                # published from here.
                workers.append(OutboxDrainer(ctx))
                # Outbound webhooks ride along every consume process: none to start apart.
                workers.append(WebhookWorkers(settings, webhook_store(ctx.store), ctx.metrics))
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


async def _cmd_eval(settings: Settings, args: argparse.Namespace) -> int:
    from service.adapters.analyzers.prompt import estimate_tokens
    from service.bootstrap.builders import make_analyzer
    from service.usecases.evaluation import (
        CostCapExceeded,
        EvalCase,
        cases_from_labels,
        estimate_cost,
        evaluate,
        has_truth,
        render,
        truth_from_edits,
    )

    overrides: dict[str, Any] = {}
    if args.analyzer:
        overrides["analyzer"] = args.analyzer
    if args.model:
        overrides["openai_model"] = args.model
    try:
        settings = msgspec.structs.replace(settings, **overrides)
        settings.__post_init__()
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    kind = settings.analyzer_kind()
    model = settings.openai_model if kind == "openai" else None

    cases: list[EvalCase]
    if args.labels:
        try:
            raw = await asyncio.to_thread(Path(args.labels).read_bytes)
            items = msgspec.json.decode(raw)
            cases = cases_from_labels(items)
        except (OSError, msgspec.DecodeError, KeyError, TypeError, ValueError) as exc:
            raise UserError(f"cannot read labeled dialogs from {args.labels}: {exc}") from None
    else:
        if not args.instance:
            raise UserError("--from-edits needs --instance NAME")
        cases = await _cases_from_edits(settings, args, has_truth, truth_from_edits)
    if args.max_dialogs:
        cases = cases[: args.max_dialogs]
    if not cases:
        raise UserError("no dialogs with ground truth to evaluate")

    estimate = estimate_cost(cases, lambda d: estimate_tokens(d, settings), model)
    if estimate.cost_usd is not None:
        print(
            f"estimated cost: ${estimate.cost_usd:.4f} for {estimate.dialogs} dialogs "
            f"(~{estimate.prompt_tokens} prompt tokens)",
            file=sys.stderr,
        )
        if estimate.cost_usd > args.max_cost:
            raise UserError(str(CostCapExceeded(estimate, args.max_cost)))
    analyzer = make_analyzer(settings)
    try:
        report = await evaluate(
            cases, analyzer, model=model, estimate=estimate, concurrency=args.concurrency
        )
    finally:
        await analyzer.close()
    print(msgspec.json.encode(report).decode() if args.json else render(report))
    return 0


async def _cases_from_edits(
    settings: Settings, args: argparse.Namespace, has_truth: Any, truth_from_edits: Any
) -> list[Any]:
    from service.adapters.stores.base import LeadQuery
    from service.bootstrap.builders import read_parts
    from service.usecases.evaluation import EvalCase

    async with read_parts(settings) as ctx:
        store, reader = ctx.store, ctx.reader
        account = args.account or await store.instance_account(args.instance)
        if account is None:
            raise UserError(
                f"instance {args.instance!r} is not mapped to an account: pass --account"
            )
        cases = []
        query = LeadQuery(user_account_id=account, instance_name=args.instance)
        async for row in store.iter_leads(query):
            if not has_truth(row):
                continue
            dialog = await reader.dialog(
                args.instance, row.contact_phone, limit=settings.max_dialog_messages
            )
            if dialog is None or not dialog.messages:
                continue
            cases.append(EvalCase(id=str(row.id), dialog=dialog, truth=truth_from_edits(row)))
            if args.max_dialogs and len(cases) >= args.max_dialogs:
                break
        return cases


async def _cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from service.cli.demo import run_demo

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
    "keys": _cmd_keys,
    "notify": _cmd_notify,
    "dlq": _cmd_dlq,
    "topology": _cmd_topology,
    "evolution-index": _cmd_index,
    "demo": _cmd_demo,
    "eval": _cmd_eval,
}
