"""Crash, restart and scale-out behaviour with real consumer processes and a real broker."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import aio_pika
import msgspec
import pytest

from service.adapters.broker.topology import Topology
from service.config import Settings
from tests.harness import (
    declare_topology,
    delete_topology,
    message_body,
    running_service,
    settings_env,
)
from tests.test_consumer import CountingAnalyzer

ROOT = Path(__file__).parent.parent


@pytest.fixture
def settings(service_settings: Settings) -> Settings:
    return service_settings


def start_consumer(settings: Settings, **overrides: str) -> subprocess.Popen[bytes]:
    env = settings_env(msgspec.structs.replace(settings, **overrides) if overrides else settings)
    env["LOG_LEVEL"] = "WARNING"
    return subprocess.Popen(
        [sys.executable, "-m", "service", "consume"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def shard_stats(settings: Settings) -> tuple[int, int]:
    """(ready messages, consumers) summed over the shard queues."""
    topology = Topology(settings)
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        ready = consumers = 0
        for shard in range(settings.queue_shards):
            queue = await channel.declare_queue(topology.shard_queue(shard), passive=True)
            ready += queue.declaration_result.message_count or 0
            consumers += queue.declaration_result.consumer_count or 0
        return ready, consumers
    finally:
        await connection.close()


async def wait_until(check, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_sigkilled_consumer_loses_nothing(settings: Settings) -> None:
    phones = [f"7702200{i:04d}" for i in range(3)]
    t0 = int(time.time()) - 900
    # The doomed consumer waits long for quiet, so it holds every event unacknowledged.
    doomed = start_consumer(settings, debounce_seconds=60.0)
    try:
        await wait_until(lambda: _has_consumers(settings, settings.queue_shards), 30, "consumer up")
        async with running_service(settings, consume=False) as svc:
            for round_, text in enumerate(["Здравствуйте, клиника", "Я владелец", "Бюджет 300к"]):
                for i, phone in enumerate(phones):
                    assert await svc.send(message_body(phone, text, ts=t0 + round_ * 60 + i)) == 200

            async def all_delivered() -> bool:
                ready, _ = await shard_stats(settings)
                return ready == 0

            await wait_until(all_delivered, 15, "events delivered to the doomed consumer")
            await asyncio.sleep(0.5)
            doomed.kill()  # SIGKILL while holding unacked events
            doomed.wait(timeout=10)
            assert all([await svc.row(p) is None for p in phones])

        analyzer = CountingAnalyzer()
        async with running_service(settings, analyzer=analyzer) as svc:
            for phone in phones:
                row = await svc.wait_row(
                    phone, lambda r: r.incoming_count == 3 and r.analyzer is not None
                )
                assert row.funnel_stage != "new_lead"
            await svc.wait_idle()
            assert sorted(analyzer.calls) == sorted(phones)
    finally:
        stop_process(doomed, signal.SIGKILL)


async def _has_consumers(settings: Settings, at_least: int) -> bool:
    _, consumers = await shard_stats(settings)
    return consumers >= at_least


async def test_sigterm_returns_held_events(settings: Settings) -> None:
    phone = "77022009999"
    t0 = int(time.time()) - 900
    proc = start_consumer(settings, debounce_seconds=60.0)
    try:
        await wait_until(lambda: _has_consumers(settings, settings.queue_shards), 30, "consumer up")
        async with running_service(settings, consume=False) as svc:
            for i, text in enumerate(["Здравствуйте, онлайн-школа", "Я основатель", "Бюджет 100к"]):
                assert await svc.send(message_body(phone, text, ts=t0 + i)) == 200

            async def delivered() -> bool:
                ready, _ = await shard_stats(settings)
                return ready == 0

            await wait_until(delivered, 15, "events delivered")
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
            assert code == 0, proc.stderr.read() if proc.stderr else b""
            assert time.monotonic() - started < 30

            async def returned() -> bool:
                ready, _ = await shard_stats(settings)
                return ready >= 1

            await wait_until(returned, 10, "events back in the queue")
    finally:
        stop_process(proc, signal.SIGKILL)


async def test_two_consumer_processes_storm(settings: Settings) -> None:
    """Two processes, 20 contacts, events in random order: every contact analysed, never
    two analyses of one contact at once, rows end on the newest message."""
    import random

    from tests.fakes.openai_server import FakeOpenAI

    phones = [f"7702400{i:04d}" for i in range(20)]
    t0 = int(time.time()) - 5000
    async with FakeOpenAI(latency=0.15) as fake:
        overrides = {
            "analyzer": "openai",
            "openai_api_key": "sk-test",
            "openai_base_url": fake.base_url,
            "openai_max_retries": 1,
            "queue_shards": 4,
        }
        s = msgspec.structs.replace(settings, **overrides)  # type: ignore[arg-type]
        await declare_topology(s)
        procs = [start_consumer(s) for _ in range(2)]
        try:
            # Declare-ok counts only the active consumer of a single-active-consumer queue;
            # give the second process a moment to register as well.
            await wait_until(lambda: _has_consumers(s, s.queue_shards), 30, "consumers up")
            await asyncio.sleep(3)
            assert all(proc.poll() is None for proc in procs)
            async with running_service(s, consume=False) as svc:
                bodies = []
                newest: dict[str, str] = {}
                for round_ in range(4):
                    for i, phone in enumerate(phones):
                        body = message_body(
                            phone,
                            f"Сообщение {round_}, номер {phone}: клиника, я владелец, бюджет 300к",
                            ts=t0 + round_ * 100 + i,
                        )
                        bodies.append(body)
                        newest[phone] = body["data"]["key"]["id"]
                random.Random(7).shuffle(bodies)
                results = await asyncio.gather(*(svc.send(b) for b in bodies))
                assert set(results) == {200}
                for phone in phones:
                    row = await svc.wait_row(
                        phone,
                        lambda r, p=phone: (
                            r.last_message_id == newest[p] and r.analyzer is not None
                        ),
                        timeout=60,
                    )
                    assert row.incoming_count == 4
            overlaps = fake.max_concurrency_by(lambda request: _phone_in(request, phones))
            assert overlaps and max(overlaps.values()) == 1, overlaps
            assert set(overlaps) == set(phones)
        finally:
            for proc in procs:
                stop_process(proc)
            await delete_topology(s)


def _phone_in(request: object, phones: list[str]) -> str | None:
    text = str(request)
    return next((p for p in phones if p in text), None)
