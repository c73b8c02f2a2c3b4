"""On a real 3-node RabbitMQ 3.10 cluster (tests/cluster.py): a node killed under load,
consume processes sharing the shards, every node down. `make test-slow` runs these."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from service.adapters.broker.connection import connect_once
from service.adapters.broker.topology import Topology
from service.config import Settings
from service.domain.facts import empty_facts
from tests.cluster import CLUSTER_URL, NODES, Cluster
from tests.fakes.openai_server import FakeOpenAI, FakeReply, RecordedRequest
from tests.harness import message_body, running_service, settings_env
from tests.test_consumer_processes import stop_process as stop

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def amqp_url(cluster: Cluster) -> str:
    """Every service_settings of this module talks to the private cluster."""
    return CLUSTER_URL


def start_consumer(settings: Settings) -> subprocess.Popen[bytes]:
    # Unlike test_consumer_processes.start_consumer, output is discarded: during a node
    # loss the processes log warnings that would fill a pipe nobody reads.
    env = settings_env(settings)
    env["LOG_LEVEL"] = "WARNING"
    return subprocess.Popen(
        [sys.executable, "-m", "service", "consume"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def hot_facts() -> dict[str, Any]:
    facts = msgspec.structs.replace(
        empty_facts("deal_closed"), niche="medicine", is_owner=True, ad_budget="500 тыс"
    )
    return msgspec.to_builtins(facts)  # type: ignore[no-any-return]


async def notifications(settings: Settings) -> list[dict[str, Any]]:
    topology = Topology(settings)
    connection = await connect_once(settings, "test")
    got = []
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(topology.notification_queue)
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            if message.routing_key == "lead.hot":
                got.append(msgspec.json.decode(message.body)["data"])
    finally:
        await connection.close()
    return got


async def dead_contacts(settings: Settings) -> set[str]:
    from service.adapters.broker.dead_letters import list_dead

    _, letters = await list_dead(settings, 1000)
    return {c for letter in letters for c in letter.contacts}


async def test_node_killed_under_load_loses_nothing(
    cluster: Cluster, service_settings: Settings
) -> None:
    """kill -9 the node leading most shard queues while webhooks arrive steadily and every
    third analysis fails (retries in flight): intake recovers through another node,
    consumers resume, every accepted event ends in a row or the DLQ, no lead.hot lost."""
    from service.logs import contact_hash

    calls = 0

    def flaky(request: RecordedRequest) -> FakeReply:
        nonlocal calls
        calls += 1
        if calls % 3 == 0:
            return FakeReply.error(500, "overloaded")
        return FakeReply.facts(hot_facts())

    async with FakeOpenAI(latency=0.05) as fake:
        fake.set_handler(flaky)
        settings = msgspec.structs.replace(
            service_settings,
            analyzer="openai",
            openai_api_key="sk-test",
            openai_base_url=fake.base_url,
            openai_max_retries=0,
            queue_shards=8,
            debounce_seconds=0.5,
            retry_delays="0.5,1,2",
            max_attempts=8,
        )
        procs = [start_consumer(settings) for _ in range(2)]
        phones = [f"7703500{i:04d}" for i in range(30)]
        t0 = int(time.time()) - 5000
        accepted: dict[str, int] = {}
        refused = 0
        kill_at: float | None = None
        first_ok_after_kill: float | None = None
        try:
            async with running_service(settings, consume=False) as svc:
                victim = cluster.busiest_node(settings.amqp_prefix)
                leaders = cluster.leaders(settings.amqp_prefix)
                await _put_intake_on(svc, 5680 + victim)
                started = time.monotonic()
                for n in range(3 * len(phones)):
                    phone = phones[n % len(phones)]
                    body = message_body(
                        phone, f"сообщение {n}", ts=t0 + n, msg_id=f"3EB0CLUSTER{n:06d}"
                    )
                    if kill_at is None and time.monotonic() - started > 3:
                        cluster.kill(victim)
                        kill_at = time.monotonic()
                    # As Evolution does: a refused webhook is sent again, until accepted.
                    while (status := await svc.send(body)) != 200:
                        assert status == 503, status
                        refused += 1
                        await asyncio.sleep(0.2)
                    if kill_at is not None and first_ok_after_kill is None:
                        first_ok_after_kill = time.monotonic()
                    accepted[phone] = accepted.get(phone, 0) + 1
                    await asyncio.sleep(0.08)  # ~10 webhooks a second
                assert kill_at is not None and first_ok_after_kill is not None
                recovery = first_ok_after_kill - kill_at

                async def settled() -> bool:
                    dead = await dead_contacts(settings)
                    for phone in phones:
                        row = await svc.row(phone)
                        done = row is not None and row.incoming_count == 3 and row.analyzer
                        if not done and contact_hash(phone) not in dead:
                            return False
                    return True

                await svc.wait_for(settled, timeout=180, what="every contact stored or dead")
                rows = {p: await svc.row(p) for p in phones}
        finally:
            for proc in procs:
                stop(proc)
        hot = {p for p, row in rows.items() if row is not None and row.interest_level == "hot"}
        notified = Counter(n["contact"] for n in await notifications(settings))
        dead = await dead_contacts(settings)
        cluster.restart(victim)
    led = sum(1 for node in leaders.values() if node == f"crmt{victim}@localhost")
    print(
        f"\nnode crmt{victim} killed (it led {led} queues); intake accepting again after "
        f"{recovery:.2f}s; {refused} webhooks "
        f"refused (503) and re-sent; {calls} analyzer calls; {len(hot)} hot leads, "
        f"{sum(notified.values())} lead.hot notifications; {len(dead)} contacts dead-lettered"
    )
    assert set(accepted.values()) == {3}
    assert recovery < 10, recovery
    assert hot, "no lead became hot"
    assert hot <= set(notified), f"lead.hot lost for {sorted(hot - set(notified))}"
    for phone in phones:
        row = rows[phone]
        assert (row is not None and row.incoming_count == 3) or contact_hash(phone) in dead


async def _put_intake_on(svc: Any, port: int) -> None:
    """Make intake's publisher use the node about to be killed (it picks a node at random),
    so the kill really takes its connection away."""
    assert await svc.send(message_body("77035999999", "привет", msg_id="3EB0CLUSTERWARM")) == 200
    connection = svc.ctx.publisher._connection
    for _ in range(10):
        if connection.url.port == port:
            return
        connection._next = [u.port for u in connection._nodes].index(port)
        await connection.transport.connection.close()
        deadline = time.monotonic() + 10
        while not connection.connected.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    raise AssertionError(f"intake not on port {port}")


def _split(cluster: Cluster, prefix: str, pids: list[int]) -> list[int]:
    """Active shards per process, as the broker sees it; asserts one active per queue."""
    active = cluster.active_consumers(prefix)
    per_pid: Counter[int] = Counter()
    for queue, names in active.items():
        assert len(names) <= 1, f"{queue} has {len(names)} active consumers"
        for name in names:
            per_pid[int(name.rsplit(" pid ", 1)[1])] += 1
    return [per_pid.get(pid, 0) for pid in pids]


async def _until_split(
    cluster: Cluster, prefix: str, pids: list[int], expected: list[int], timeout: float
) -> float:
    started = time.monotonic()
    while True:
        split = _split(cluster, prefix, pids)
        if sorted(split) == sorted(expected) and sum(split) == sum(expected):
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"split {split}, expected {expected}"
        await asyncio.sleep(0.5)


async def test_processes_started_apart_share_eight_shards(
    cluster: Cluster, service_settings: Settings
) -> None:
    settings = msgspec.structs.replace(service_settings, queue_shards=8)
    from tests.harness import declare_topology

    await declare_topology(settings)
    procs: list[subprocess.Popen[bytes]] = []
    times = []
    try:
        for expected in ([8], [4, 4], [3, 3, 2]):
            procs.append(start_consumer(settings))
            pids = [p.pid for p in procs]
            times.append(await _until_split(cluster, settings.amqp_prefix, pids, expected, 45))
        # kill -9 one: its heartbeats stop, the survivors take its shards.
        procs[1].kill()
        procs[1].wait()
        survivors = [procs[0].pid, procs[2].pid]
        times.append(await _until_split(cluster, settings.amqp_prefix, survivors, [4, 4], 45))
    finally:
        for proc in procs:
            stop(proc)
    print(
        "\nconverged after start of 1st/2nd/3rd process and kill -9 of one: "
        + ", ".join(f"{t:.1f}s" for t in times)
    )
    assert max(times) < 30


async def test_every_node_down_intake_answers_503_at_once_then_resumes(
    cluster: Cluster, service_settings: Settings
) -> None:
    settings = service_settings
    phone = "77035100001"
    t0 = int(time.time()) - 900
    async with running_service(settings) as svc:
        assert await svc.send(message_body(phone, "Здравствуйте, у нас клиника", ts=t0)) == 200
        await svc.wait_row(phone)
        for n in NODES:
            cluster.ctl(n, "stop_app")
        try:
            took = []
            for _ in range(5):
                body = message_body(phone, "Я владелец клиники", ts=t0 + 60, msg_id="CLUSTERSAME1")
                started = time.monotonic()
                assert await svc.send(body) == 503
                took.append(time.monotonic() - started)
                await asyncio.sleep(0.3)
        finally:
            # The node stopped last starts first: the others wait for its tables.
            for n in reversed(NODES):
                cluster.ctl(n, "start_app")
        print(f"\n503 with every node down took {', '.join(f'{t:.2f}s' for t in took)}")
        assert max(took[1:]) < 1.0, took

        async def accepted() -> bool:
            body = message_body(phone, "Я владелец клиники", ts=t0 + 60, msg_id="CLUSTERSAME1")
            return await svc.send(body) == 200

        await svc.wait_for(accepted, timeout=60, what="intake accepting again")
        assert await svc.send(message_body(phone, "Бюджет 500 тыс тенге", ts=t0 + 120)) == 200
        row = await svc.wait_row(
            phone, lambda r: r.incoming_count == 3 and r.analyzer is not None, timeout=90
        )
        assert row.budget_stated is True


async def test_connections_are_named_with_host_and_pid(cluster: Cluster) -> None:
    """The broker shows which process each connection is (client_properties)."""
    import json
    import socket

    connection = await connect_once(Settings(amqp_url=CLUSTER_URL), "consume")
    try:
        out = cluster.ctl(1, "list_connections", "client_properties", "-q", "--formatter", "json")
    finally:
        await connection.close()
    names = [
        str(value)
        for row in json.loads(out)
        for key, _, value in row["client_properties"]
        if key == "connection_name"
    ]
    assert f"crm-consume {socket.gethostname()} pid {os.getpid()}" in names
