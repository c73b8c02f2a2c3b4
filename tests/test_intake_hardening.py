"""Hostile webhook bodies on the real intake and RabbitMQ: refused with a 400 and nothing
queued, or clamped; compressed bodies bounded; nothing echoed unbounded."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from service.config import Settings
from service.usecases.intake import Accepted
from tests.test_intake import URL, body_of, intake_app, message, post
from tests.test_publisher import WEBHOOK_TOKEN, amqp_settings, drain, events_of


@pytest.fixture
async def settings(amqp_url: str, amqp_prefix: str) -> AsyncIterator[Settings]:
    from tests.harness import declare_topology, delete_topology

    s = amqp_settings(amqp_url, amqp_prefix, webhook_max_body_bytes=64 * 1024)
    await declare_topology(s)  # so an empty queue can be checked
    yield s
    await delete_topology(s)


def with_nul(where: str) -> dict[str, Any]:
    body = message()
    data = body["data"]
    if where == "instance":
        body["instance"] = "clinic\x00sales"
    elif where == "jid":
        data["key"]["remoteJid"] = "77017654321\x00@s.whatsapp.net"
    elif where == "key.id":
        data["key"]["id"] = "3EB0\x00C431"
    elif where == "text":
        data["message"] = {"conversation": "Здравствуйте\x00"}
    else:
        data["pushName"] = "Ай\x00герим"
    return body


@pytest.mark.parametrize("where", ["instance", "jid", "key.id", "text", "pushName"])
async def test_nul_anywhere_is_400_and_nothing_is_queued(settings: Settings, where: str) -> None:
    async with intake_app(settings) as (client, _):
        status, answer = await post(client, body_of(with_nul(where)))
        assert status == 400, answer
        assert "NUL" in answer["error"]
        # A good body right after still goes through: the connection and intake are fine.
        assert (await post(client, body_of(message(msg_id="GOOD1"))))[0] == 200
    assert [e.message_id for e in events_of(await drain(settings))] == ["GOOD1"]


async def test_key_id_over_amqp_message_id_limit_is_400(settings: Settings) -> None:
    async with intake_app(settings) as (client, _):
        status, answer = await post(client, body_of(message(msg_id="A" * 300)))
        assert status == 400 and "key.id too long" in answer["error"]
        # 255 bytes with the instance name is still fine.
        fits = "B" * (255 - len("clinic-sales:"))
        assert (await post(client, body_of(message(msg_id=fits))))[0] == 200
    assert [e.message_id for e in events_of(await drain(settings))] == [fits]


async def test_json_nested_10000_deep_is_400(settings: Settings) -> None:
    deep = "[" * 10_000 + "]" * 10_000
    raw = json.dumps(message())[:-1] + f', "extra": {deep}}}'
    async with intake_app(settings) as (client, _):
        status, answer = await post(client, raw.encode())
        assert status == 400 and "nested too deeply" in answer["error"]
    assert events_of(await drain(settings)) == []


async def raw_http(client: Any, request: bytes) -> bytes:
    """Send `request` as bytes (headers a client library would refuse) and read the answer."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()


async def test_non_utf8_auth_headers_are_401_not_500(settings: Settings) -> None:
    payload = body_of(message())
    async with intake_app(settings) as (client, _):
        for header in (
            b"X-Webhook-Token: \xff\xfe",
            b"apikey: \xff\xfe",
            b"Authorization: Bearer \xff",
        ):
            answer = await raw_http(
                client,
                b"POST /webhooks/evolution HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                + header
                + b"\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(payload)).encode()
                + b"\r\n\r\n"
                + payload,
            )
            assert answer.startswith(b"HTTP/1.1 401"), (header, answer[:200])
    assert events_of(await drain(settings)) == []


@pytest.mark.parametrize(
    "stamp", [99_999_999_999, {"low": -1, "high": 0}, {"low": 0, "high": 1}, "99999999999"]
)
async def test_timestamps_from_the_future_are_clamped_to_receipt(
    settings: Settings, stamp: Any
) -> None:
    before = int(time.time())
    async with intake_app(settings) as (client, _):
        assert (await post(client, body_of(message(timestamp=stamp))))[0] == 200
    (event,) = events_of(await drain(settings))
    assert before <= event.timestamp <= int(time.time()) + 1


def test_small_clock_skew_is_kept() -> None:
    from service.usecases.intake_guard import parse_checked

    now = 1_800_000_000
    outcome = parse_checked(body_of(message(timestamp=now + 120)), now=now)
    assert isinstance(outcome, Accepted) and outcome.events[0].timestamp == now + 120
    outcome = parse_checked(body_of(message(timestamp=now + 301)), now=now)
    assert isinstance(outcome, Accepted) and outcome.events[0].timestamp == now


async def test_huge_event_names_are_not_echoed(settings: Settings) -> None:
    name = "x" * 60_000
    async with intake_app(settings) as (client, _):
        resp = await client.post(
            f"/webhooks/evolution/{name[:7000]}?token={WEBHOOK_TOKEN}",
            data=body_of(message(event="messages.upsert")),
        )
        text = await resp.text()
        assert resp.status == 400 and len(text) < 600
        status, answer = await post(client, body_of({**message(), "event": name}))
        assert status == 200 and len(answer["ignored"]) <= 201
    assert events_of(await drain(settings)) == []


# -- compressed bodies ---------------------------------------------------------------------
async def test_gzip_body_is_inflated_within_the_limit(settings: Settings) -> None:
    async with intake_app(settings) as (client, _):
        resp = await client.post(
            URL, data=gzip.compress(body_of(message())), headers={"Content-Encoding": "gzip"}
        )
        assert resp.status == 200, await resp.text()
    assert len(events_of(await drain(settings))) == 1


async def test_gzip_bomb_is_413_after_the_limit(settings: Settings) -> None:
    # 8 MiB of zeros inside a JSON string: 8 KiB compressed, 128 times the 64 KiB limit.
    bomb = gzip.compress(b'{"event": "messages.upsert", "x": "' + b"0" * (8 << 20) + b'"}')
    assert len(bomb) < 64 * 1024
    async with intake_app(settings) as (client, _):
        resp = await client.post(URL, data=bomb, headers={"Content-Encoding": "gzip"})
        assert resp.status == 413 and (await resp.json())["ok"] is False
    assert events_of(await drain(settings)) == []


async def test_gzip_without_token_is_401_and_not_inflated(settings: Settings) -> None:
    # 64 MiB of zeros in 64 KiB each: inflating twenty of them costs seconds of CPU.
    bomb = gzip.compress(b"0" * (64 << 20))
    async with intake_app(settings) as (client, ctx):
        started = time.process_time()
        for _ in range(20):
            resp = await client.post(
                "/webhooks/evolution", data=bomb, headers={"Content-Encoding": "gzip"}
            )
            assert resp.status == 401
            await resp.read()
        spent = time.process_time() - started
        assert ctx.metrics.webhook_events.labels("unknown", "unauthorized")._value.get() == 20
    # Refusing reads at most the compressed bytes; inflating would take over a second.
    assert spent < 0.5, f"{spent:.2f} s of CPU to refuse 20 compressed bodies"


@pytest.mark.parametrize(
    ("encoding", "data", "status"),
    [
        ("gzip", b"\x1f\x8b\x08\x00garbage-not-gzip", 400),
        ("gzip", gzip.compress(b'{"event": "x"}')[:-6], 400),  # truncated
        ("deflate", zlib.compress(b"{") + b"junk", 400),
        ("br", b"{}", 415),
    ],
)
async def test_bad_or_unknown_encodings_are_refused(
    settings: Settings, encoding: str, data: bytes, status: int
) -> None:
    async with intake_app(settings) as (client, _):
        resp = await client.post(URL, data=data, headers={"Content-Encoding": encoding})
        assert resp.status == status, await resp.text()
    assert events_of(await drain(settings)) == []
