"""Webhook intake: the pure decoder, then the HTTP endpoint on the real RabbitMQ."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from loguru import logger

from handlers.http_app import make_app
from service.adapters.broker.envelope import H_IDEMPOTENCY_KEYS, decode_batch, shard_for
from service.bootstrap.context import AppContext
from service.config import Settings
from service.usecases.intake import (
    Accepted,
    Ignored,
    Rejected,
    event_label,
    normalize_event,
    parse_webhook,
)
from tests.parts import parts_around
from tests.test_publisher import (
    API_TOKEN,
    WEBHOOK_TOKEN,
    TcpProxy,
    amqp_settings,
    closed_port,
    drain,
    events_of,
    via_proxy,
)

URL = f"/webhooks/evolution?token={WEBHOOK_TOKEN}"


def body_of(payload: Any) -> bytes:
    return json.dumps(payload).encode()


def message(
    *,
    jid: str = "77017654321@s.whatsapp.net",
    msg_id: str = "3EB0C431C26A1916E07E",
    event: str | None = "messages.upsert",
    content: dict[str, Any] | None = None,
    message_type: str = "conversation",
    timestamp: Any = 1759482845,
    **key: Any,
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "instance": "clinic-sales",
        "data": {
            "key": {"remoteJid": jid, "fromMe": False, "id": msg_id, **key},
            "pushName": "Айгерим",
            "message": content if content is not None else {"conversation": "Здравствуйте"},
            "messageType": message_type,
            "messageTimestamp": timestamp,
        },
    }
    if event is not None:
        payload["event"] = event
    return payload


# -- the pure decoder ---------------------------------------------------------------------
SAMPLES: dict[str, tuple[str, str]] = {
    # name: (outcome, phone JID or ignore reason)
    "connection-update": ("ignored", "connection.update"),
    "messages-upsert-audio-transcribed": ("queued", "79161234567@s.whatsapp.net"),
    "messages-upsert-fromme-phone": ("queued", "77017654321@s.whatsapp.net"),
    "messages-upsert-group": ("ignored", "group"),
    "messages-upsert-image-caption": ("queued", "79161234567@s.whatsapp.net"),
    "messages-upsert-lid-addressed": ("queued", "77051112233@s.whatsapp.net"),
    "messages-upsert-status-broadcast": ("ignored", "broadcast"),
    "messages-upsert-text-incoming": ("queued", "77017654321@s.whatsapp.net"),
    "send-message-api": ("queued", "77017654321@s.whatsapp.net"),
}


def test_every_sample_body_is_covered(webhook_bodies: dict[str, dict[str, Any]]) -> None:
    assert set(webhook_bodies) == set(SAMPLES)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_bodies(name: str, webhook_bodies: dict[str, dict[str, Any]]) -> None:
    raw = webhook_bodies[name]
    outcome = parse_webhook(body_of(raw))
    kind, expected = SAMPLES[name]
    if kind == "ignored":
        assert isinstance(outcome, Ignored) and outcome.reason == expected
        return
    assert isinstance(outcome, Accepted), outcome
    assert outcome.instance == "clinic-sales" and outcome.event == raw["event"]
    [event] = outcome.events
    data = raw["data"]
    assert event.phone_jid == expected
    assert event.message_id == data["key"]["id"]
    assert event.remote_jid == data["key"]["remoteJid"]
    assert event.from_me is data["key"]["fromMe"]
    assert event.timestamp == data["messageTimestamp"]
    assert event.message_type == data["messageType"]
    assert event.text  # readable text of every kind of message
    assert event.idempotency_key == f"clinic-sales:{data['key']['id']}"


def test_texts_of_media_samples(webhook_bodies: dict[str, dict[str, Any]]) -> None:
    audio = parse_webhook(body_of(webhook_bodies["messages-upsert-audio-transcribed"]))
    image = parse_webhook(body_of(webhook_bodies["messages-upsert-image-caption"]))
    assert isinstance(audio, Accepted) and isinstance(image, Accepted)
    assert audio.events[0].text == "[audio] Да, я владелец, давайте созвонимся в четверг в 11"
    assert image.events[0].text is not None and image.events[0].text.startswith("[image] Вот")
    assert image.events[0].push_name == "Dr. Petrov"


@pytest.mark.parametrize(
    "name", ["messages.upsert", "MESSAGES_UPSERT", "messages-upsert", " Messages.Upsert "]
)
def test_event_name_forms(name: str) -> None:
    assert normalize_event(name) == "messages.upsert"
    outcome = parse_webhook(body_of(message(event=name)))
    assert isinstance(outcome, Accepted) and outcome.event == "messages.upsert"
    assert outcome.events[0].event == "messages.upsert"


def test_path_event_fills_in_and_must_match() -> None:
    outcome = parse_webhook(body_of(message(event=None)), "messages-upsert")
    assert isinstance(outcome, Accepted) and outcome.event == "messages.upsert"
    outcome = parse_webhook(body_of(message(event="SEND_MESSAGE")), "send-message")
    assert isinstance(outcome, Accepted) and outcome.event == "send.message"
    mismatch = parse_webhook(body_of(message(event="send.message")), "messages-upsert")
    assert isinstance(mismatch, Rejected)
    assert "does not match" in mismatch.reason
    other = parse_webhook(body_of({"instance": "i", "data": {}}), "connection-update")
    assert isinstance(other, Ignored) and other.reason == "connection.update"


def test_messages_set_in_both_shapes() -> None:
    items = [
        message(msg_id="A1", jid="77010000001@s.whatsapp.net")["data"],
        message(msg_id="A2", jid="120363025246125486@g.us")["data"],
        message(msg_id="A3", jid="77010000003@s.whatsapp.net")["data"],
    ]
    for data in (items, {"messages": items, "isLatest": True}):
        outcome = parse_webhook(body_of({"event": "messages.set", "instance": "i", "data": data}))
        assert isinstance(outcome, Accepted), outcome
        assert [e.message_id for e in outcome.events] == ["A1", "A3"]
        assert outcome.skipped == 1
        assert {e.event for e in outcome.events} == {"messages.set"}


def test_a_broken_item_of_a_list_is_skipped_but_a_lone_one_rejected() -> None:
    good = message(msg_id="B1")["data"]
    broken = {"key": {"remoteJid": "77010000009@s.whatsapp.net"}}
    outcome = parse_webhook(
        body_of({"event": "messages.set", "instance": "i", "data": [good, broken]})
    )
    assert isinstance(outcome, Accepted) and [e.message_id for e in outcome.events] == ["B1"]
    alone = parse_webhook(body_of({"event": "messages.set", "instance": "i", "data": [broken]}))
    assert isinstance(alone, Rejected) and alone.reason == "data[0].key.id missing"
    empty = parse_webhook(body_of({"event": "messages.set", "instance": "i", "data": []}))
    assert isinstance(empty, Ignored) and empty.reason == "no messages"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (1759482845, 1759482845),
        ("1759482845", 1759482845),
        (1759482845.7, 1759482845),
        (1759482845123, 1759482845),  # milliseconds
        ({"low": 1759482845, "high": 0, "unsigned": False}, 1759482845),
        ({"low": -1, "high": 0}, 4294967295),  # low half is unsigned
    ],
)
def test_timestamp_shapes(raw: Any, expected: int) -> None:
    outcome = parse_webhook(body_of(message(timestamp=raw)))
    assert isinstance(outcome, Accepted) and outcome.events[0].timestamp == expected


def test_missing_timestamp_uses_receipt_time_and_garbage_is_rejected() -> None:
    payload = message()
    del payload["data"]["messageTimestamp"]
    outcome = parse_webhook(body_of(payload), received_at=1_700_000_000)
    assert isinstance(outcome, Accepted) and outcome.events[0].timestamp == 1_700_000_000
    bad = parse_webhook(body_of(message(timestamp="yesterday")))
    assert isinstance(bad, Rejected) and "messageTimestamp" in bad.reason


MALFORMED: list[tuple[str, bytes, str]] = [
    ("empty body", b"", "empty body"),
    ("whitespace", b"  \n", "empty body"),
    ("not JSON", b"event=messages.upsert", "malformed JSON"),
    ("truncated JSON", b'{"event": "messages.upsert", ', "malformed JSON"),
    ("JSON array", b"[]", "body must be a JSON object, not array"),
    ("JSON string", b'"hello"', "body must be a JSON object, not str"),
    ("JSON null", b"null", "body must be a JSON object, not null"),
    ("missing event", body_of(message(event=None)), "missing event"),
    ("empty event", body_of(message(event="")), "missing event"),
    ("event a number", body_of({**message(), "event": 5}), "event must be str, not int"),
    ("missing instance", body_of({**message(), "instance": None}), "missing instance"),
    ("empty instance", body_of({**message(), "instance": "  "}), "missing instance"),
    ("instance a list", body_of({**message(), "instance": ["a"]}), "instance must be str"),
    ("missing data", body_of({"event": "messages.upsert", "instance": "i"}), "missing data"),
    ("data null", body_of({"event": "messages.upsert", "instance": "i", "data": None}), "data"),
    (
        "data a string",
        body_of({"event": "messages.upsert", "instance": "i", "data": "x"}),
        "data must be a message object or a list of them, not str",
    ),
    (
        "missing key",
        body_of({"event": "messages.upsert", "instance": "i", "data": {"pushName": "x"}}),
        "data.key missing",
    ),
    ("missing remoteJid", body_of(message(jid="")), "data.key.remoteJid missing"),
    ("missing key.id", body_of(message(msg_id="")), "data.key.id missing"),
    ("key.id a number", body_of(message(msg_id=123)), "data.key.id must be str, not int"),  # type: ignore[arg-type]
    ("fromMe a string", body_of(message(fromMe="yes")), "data.key.fromMe must be bool"),
    ("message a list", body_of(message(content=[1])), "data.message must be object"),  # type: ignore[arg-type]
    ("timestamp a list", body_of(message(timestamp=[1])), "data.messageTimestamp must be"),
]


@pytest.mark.parametrize(("label", "raw", "reason"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_bodies_are_rejected(label: str, raw: bytes, reason: str) -> None:
    outcome = parse_webhook(raw)
    assert isinstance(outcome, Rejected), outcome
    assert reason in outcome.reason


def test_unknown_fields_and_odd_extras_are_tolerated() -> None:
    payload = message()
    payload["future_field"] = {"nested": [1, 2, 3]}
    payload["data"]["key"]["addressingMode"] = "pn"
    payload["data"]["contextInfo"] = {"stanzaId": "x"}
    outcome = parse_webhook(body_of(payload))
    assert isinstance(outcome, Accepted) and outcome.events[0].text == "Здравствуйте"


@pytest.mark.parametrize(
    ("content", "message_type"),
    [
        ({"reactionMessage": {"text": "👍", "key": {"id": "X"}}}, "reactionMessage"),
        ({"protocolMessage": {"type": "REVOKE"}}, "protocolMessage"),
    ],
)
def test_non_dialog_messages_are_ignored(content: dict[str, Any], message_type: str) -> None:
    outcome = parse_webhook(body_of(message(content=content, message_type=message_type)))
    assert isinstance(outcome, Ignored) and outcome.reason == "not_dialog"


def test_newsletter_ignored_and_lid_without_phone_still_queued() -> None:
    news = parse_webhook(body_of(message(jid="120363111111111111@newsletter")))
    assert isinstance(news, Ignored) and news.reason == "newsletter"
    lid = parse_webhook(body_of(message(jid="181736458731542@lid")))
    assert isinstance(lid, Accepted)
    assert lid.events[0].phone_jid is None and lid.events[0].contact_key == "181736458731542@lid"
    via_sender = parse_webhook(
        body_of(message(jid="181736458731542@lid", senderPn="77051112233@s.whatsapp.net"))
    )
    assert isinstance(via_sender, Accepted)
    assert via_sender.events[0].phone_jid == "77051112233@s.whatsapp.net"


def test_base64_media_never_enters_the_queue() -> None:
    blob = "QUJD" * 50_000  # 200 kB of inline media
    content = {
        "imageMessage": {"caption": "прайс", "mimetype": "image/jpeg", "jpegThumbnail": blob},
        "base64": blob,
    }
    outcome = parse_webhook(body_of(message(content=content, message_type="imageMessage")))
    assert isinstance(outcome, Accepted)
    encoded = msgspec.json.encode(outcome.events)
    assert b"QUJDQUJD" not in encoded and len(encoded) < 1000
    assert outcome.events[0].text == "[image] прайс"


def test_event_labels_are_bounded() -> None:
    assert event_label("messages.upsert") == "messages.upsert"
    assert event_label("connection.update") == "connection.update"
    assert event_label("made.up.event") == "other"
    assert event_label("") == "unknown"


# -- over HTTP, on the real broker -------------------------------------------------------------
@contextlib.asynccontextmanager
async def intake_app(settings: Settings) -> AsyncIterator[tuple[TestClient[Any, Any], AppContext]]:
    """The real intake app (real publisher) on a local test server."""
    async with parts_around(settings) as ctx:
        client: TestClient[Any, Any] = TestClient(TestServer(make_app(ctx)))
        await client.start_server()
        try:
            yield client, ctx
        finally:
            await client.close()


@pytest.fixture
async def settings(amqp_url: str, amqp_prefix: str) -> AsyncIterator[Settings]:
    from tests.harness import delete_topology

    s = amqp_settings(amqp_url, amqp_prefix, webhook_max_body_bytes=4096)
    yield s
    await delete_topology(s)


async def post(client: TestClient[Any, Any], data: bytes, path: str = URL) -> tuple[int, Any]:
    resp = await client.post(path, data=data, headers={"Content-Type": "application/json"})
    assert resp.content_type == "application/json"
    return resp.status, await resp.json()


def counter(ctx: AppContext, event: str, outcome: str) -> float:
    value: float = ctx.metrics.webhook_events.labels(event, outcome)._value.get()
    return value


async def test_sample_webhooks_over_http(
    settings: Settings, webhook_bodies: dict[str, dict[str, Any]]
) -> None:
    async with intake_app(settings) as (client, ctx):
        for name, raw in webhook_bodies.items():
            status, answer = await post(client, body_of(raw))
            kind, expected = SAMPLES[name]
            assert status == 200, (name, answer)
            if kind == "queued":
                assert answer == {"ok": True, "queued": 1}
            else:
                assert answer == {"ok": True, "ignored": expected}
        assert counter(ctx, "messages.upsert", "queued") == 5
        assert counter(ctx, "messages.upsert", "ignored") == 2
        assert counter(ctx, "connection.update", "ignored") == 1
    got = await drain(settings)
    queued = {e.message_id: (shard, e) for shard, m in got for e in decode_batch(m.body).events}
    expected_ids = {
        raw["data"]["key"]["id"]: raw
        for name, raw in webhook_bodies.items()
        if SAMPLES[name][0] == "queued"
    }
    assert set(queued) == set(expected_ids)
    for msg_id, raw in expected_ids.items():
        shard, event = queued[msg_id]
        assert event.phone_jid == SAMPLES[_name_of(webhook_bodies, raw)][1]
        assert shard == shard_for("clinic-sales", event.contact_key, settings.queue_shards)
        assert event.text and event.instance == "clinic-sales"
    for _, amqp_message in got:
        keys = list((amqp_message.headers or {})[H_IDEMPOTENCY_KEYS])  # type: ignore[arg-type]
        assert keys == [e.idempotency_key for e in decode_batch(amqp_message.body).events]
        assert amqp_message.delivery_mode == 2  # persistent


def _name_of(bodies: dict[str, dict[str, Any]], raw: dict[str, Any]) -> str:
    return next(name for name, body in bodies.items() if body is raw)


async def test_malformed_bodies_get_400_and_queue_nothing(settings: Settings) -> None:
    async with intake_app(settings) as (client, ctx):
        for label, raw, reason in MALFORMED:
            status, answer = await post(client, raw)
            assert status == 400, label
            assert answer["ok"] is False and reason in answer["error"], (label, answer)
        # A valid body afterwards proves the broker was reachable all along.
        assert (await post(client, body_of(message())))[0] == 200
        rejected = sum(
            counter(ctx, event, "rejected") for event in ("unknown", "messages.upsert", "other")
        )
        assert rejected == len(MALFORMED)
    assert len(events_of(await drain(settings))) == 1


async def test_path_event_routes(settings: Settings) -> None:
    async with intake_app(settings) as (client, _):
        status, answer = await post(
            client,
            body_of(message(event=None)),
            f"/webhooks/evolution/messages-upsert?token={WEBHOOK_TOKEN}",
        )
        assert (status, answer) == (200, {"ok": True, "queued": 1})
        status, answer = await post(
            client,
            body_of(message(event="send.message")),
            f"/webhooks/evolution/messages-upsert?token={WEBHOOK_TOKEN}",
        )
        assert status == 400 and "does not match" in answer["error"]
        status, answer = await post(
            client,
            body_of({"instance": "clinic-sales", "data": {"state": "open"}}),
            f"/webhooks/evolution/connection-update?token={WEBHOOK_TOKEN}",
        )
        assert (status, answer) == (200, {"ok": True, "ignored": "connection.update"})
    assert len(events_of(await drain(settings))) == 1


async def test_oversize_body_gets_413(settings: Settings) -> None:
    big = body_of({**message(), "padding": "x" * 8000})

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 1000):
            yield big[start : start + 1000]

    async with intake_app(settings) as (client, ctx):
        status, answer = await post(client, big)
        assert status == 413 and answer["ok"] is False and "4096" in answer["error"]
        resp = await client.post(URL, data=chunked())  # no Content-Length
        assert resp.status == 413 and (await resp.json())["ok"] is False
        assert counter(ctx, "unknown", "too_large") == 2
        # Just under the limit is fine.
        status, _ = await post(client, body_of({**message(), "padding": "x" * 2000}))
        assert status == 200
    assert len(events_of(await drain(settings))) == 1


async def test_broker_down_gives_503_and_ignored_events_still_pass(settings: Settings) -> None:
    dead = msgspec.structs.replace(
        settings, amqp_url=f"amqp://guest:guest@127.0.0.1:{closed_port()}/"
    )
    async with intake_app(dead) as (client, ctx):
        status, answer = await post(client, body_of(message()))
        assert (status, answer) == (503, {"ok": False, "error": "queue unavailable, retry later"})
        assert counter(ctx, "messages.upsert", "unavailable") == 1
        status, answer = await post(client, body_of({**message(), "event": "connection.update"}))
        assert (status, answer) == (200, {"ok": True, "ignored": "connection.update"})


async def test_intake_recovers_when_broker_comes_back(settings: Settings, amqp_url: str) -> None:
    import aio_pika

    url = aio_pika.connection.make_url(amqp_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5672)
    await proxy.start()
    await proxy.stop()  # the port is known, nothing listens
    try:
        async with intake_app(via_proxy(settings, proxy)) as (client, _):
            assert (await post(client, body_of(message(msg_id="R1"))))[0] == 503
            await proxy.start()
            statuses = []
            for _ in range(40):  # Evolution's retries, compressed
                status, _answer = await post(client, body_of(message(msg_id="R1")))
                statuses.append(status)
                if status == 200:
                    break
                await asyncio.sleep(0.25)
            assert statuses[-1] == 200, statuses
    finally:
        await proxy.stop()
    assert [e.message_id for e in events_of(await drain(settings))] == ["R1"]


async def test_500_concurrent_webhooks_are_all_queued_in_fewer_messages(
    settings: Settings,
) -> None:
    async with intake_app(settings) as (client, ctx):
        assert (await post(client, body_of(message(msg_id="WARM"))))[0] == 200

        async def one(n: int) -> int:
            payload = message(msg_id=f"C{n:04d}", jid=f"7701{n % 50:07d}@s.whatsapp.net")
            status, _ = await post(client, body_of(payload))
            return status

        statuses = await asyncio.gather(*(one(n) for n in range(500)))
        assert statuses == [200] * 500
        assert counter(ctx, "messages.upsert", "queued") == 501
    got = await drain(settings)
    ids = [e.message_id for e in events_of(got)]
    assert len(ids) == 501 and len(set(ids)) == 501
    assert len(got) < 501, "every event went in its own AMQP message"


async def test_request_id_and_metrics_endpoint(settings: Settings) -> None:
    async with intake_app(settings) as (client, _):
        resp = await client.post(URL, data=body_of(message()), headers={"X-Request-Id": "abc-123"})
        assert resp.status == 200 and resp.headers["X-Request-Id"] == "abc-123"
        resp = await client.post(URL, data=b"[]", headers={"X-Request-Id": "bad id;x"})
        assert resp.status == 400
        generated = resp.headers["X-Request-Id"]
        assert len(generated) == 16 and generated != "bad id;x"
        auth = {"Authorization": f"Bearer {API_TOKEN}"}
        text = await (await client.get("/metrics", headers=auth)).text()
        assert 'crm_webhook_events_total{event="messages.upsert",outcome="queued"} 1.0' in text
        assert 'crm_webhook_events_total{event="unknown",outcome="rejected"} 1.0' in text
    await drain(settings)


@pytest.mark.parametrize("log_level", ["WARNING", "DEBUG"])
async def test_webhook_request_id_and_errors_on_either_path(
    amqp_url: str, amqp_prefix: str, log_level: str
) -> None:
    """Without DEBUG logging the webhooks skip the other middlewares; with it they run
    through them. Either way: the request id on the answer and on the handler's log
    lines, and an unexpected error answered as JSON 500."""
    from tests.harness import delete_topology

    settings = amqp_settings(
        amqp_url, amqp_prefix, webhook_max_body_bytes=4096, log_level=log_level
    )
    records: list[dict[str, Any]] = []
    sink = logger.add(lambda m: records.append(m.record), level="INFO")
    try:
        async with intake_app(settings) as (client, ctx):
            resp = await client.post(
                "/webhooks/evolution?token=wrong",
                data=body_of(message()),
                headers={"X-Request-Id": "req-401"},
            )
            assert resp.status == 401 and resp.headers["X-Request-Id"] == "req-401"
            assert (await resp.json())["ok"] is False

            async def broken(events: Any) -> None:
                raise RuntimeError("publisher bug")

            ctx.publisher.publish = broken  # type: ignore[method-assign,union-attr]
            resp = await client.post(
                URL, data=body_of(message()), headers={"X-Request-Id": "req-500"}
            )
            assert resp.status == 500 and resp.headers["X-Request-Id"] == "req-500"
            assert await resp.json() == {"success": False, "error": "internal error"}
    finally:
        logger.remove(sink)
        await delete_topology(settings)
    refused = [r for r in records if r["message"].startswith("webhook refused")]
    assert [r["extra"].get("request_id") for r in refused] == ["req-401"]
    failed = [r for r in records if r["message"].startswith("unhandled error")]
    assert len(failed) == 1 and failed[0]["extra"].get("request_id") == "req-500"
    assert failed[0]["exception"] is not None
    assert counter(ctx, "unknown", "unauthorized") == 1


async def test_no_phone_or_text_in_logs_above_debug(
    settings: Settings, webhook_bodies: dict[str, dict[str, Any]]
) -> None:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m) + str(m.record["extra"])), level="INFO")
    try:
        async with intake_app(settings) as (client, _):
            for raw in webhook_bodies.values():
                await post(client, body_of(raw))
            await post(client, body_of(message(msg_id="")))  # rejected: logged at INFO
            await client.post("/webhooks/evolution?token=wrong", data=body_of(message()))
    finally:
        logger.remove(sink)
    assert any("rejected" in line for line in lines) and any("refused" in line for line in lines)
    joined = "\n".join(lines)
    for raw in webhook_bodies.values():
        jid = raw["data"].get("key", {}).get("remoteJid")
        if jid:
            assert jid.split("@")[0] not in joined
    assert "Здравствуйте" not in joined and "стоматология" not in joined
    assert WEBHOOK_TOKEN not in joined
    await drain(settings)


# -- Evolution's own exchange, bridged into the same intake ------------------------------------
async def test_evolution_exchange_bridge(
    settings: Settings, webhook_bodies: dict[str, dict[str, Any]]
) -> None:
    import aio_pika

    from consumers.evolution_bridge import EvolutionBridge
    from service.adapters.broker.topology import Topology
    from tests.test_publisher import queued_count

    source = f"{settings.amqp_prefix}.evolution-src"
    bridged = msgspec.structs.replace(settings, evolution_amqp_exchange=source)
    topology = Topology(bridged)
    parts = contextlib.AsyncExitStack()
    ctx = await parts.enter_async_context(parts_around(bridged))
    bridge = EvolutionBridge(ctx)
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        await bridge.start()
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(source)
        sent = {
            "messages.upsert": webhook_bodies["messages-upsert-text-incoming"],
            "SEND_MESSAGE": webhook_bodies["send-message-api"],
            "MESSAGES_UPSERT": webhook_bodies["messages-upsert-group"],  # ignored: a group
        }
        for routing_key, raw in sent.items():
            without_destination = {k: v for k, v in raw.items() if k != "destination"}
            await exchange.publish(aio_pika.Message(body_of(without_destination)), routing_key)
        await exchange.publish(aio_pika.Message(b"{not json"), "messages.upsert")

        deadline = asyncio.get_running_loop().time() + 10
        while asyncio.get_running_loop().time() < deadline:
            dead = await queued_count(settings, topology.dead_queue)
            backlog = await queued_count(settings, topology.bridge_queue)
            if dead == 1 and backlog == 0 and counter(ctx, "messages.upsert", "ignored") == 1:
                break
            await asyncio.sleep(0.1)
        assert await queued_count(settings, topology.dead_queue) == 1
        assert counter(ctx, "messages.upsert", "queued") == 1
        assert counter(ctx, "send.message", "queued") == 1
        assert counter(ctx, "unknown", "rejected") == 1
    finally:
        await bridge.stop()
        await parts.aclose()
        channel = await connection.channel()
        await channel.exchange_delete(source)
        await connection.close()
    ids = sorted(e.message_id for e in events_of(await drain(settings)))
    assert ids == ["3EB0C431C26A1916E07E", "BAE5F1E2D3C4B5A69788"]
