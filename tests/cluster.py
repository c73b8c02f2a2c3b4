"""A private 3-node RabbitMQ 3.10 cluster for the slow tests (scripts/cluster.sh does the
work): started once per test module, removed after; never the machine's own broker."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "scripts" / "cluster.sh"
NODES = (1, 2, 3)
CLUSTER_URL = "amqp://guest:guest@127.0.0.1:5681,127.0.0.1:5682,127.0.0.1:5683/"


def node_name(n: int) -> str:
    return f"crmt{n}@localhost"


class Cluster:
    def _run(self, *args: str, timeout: float = 180) -> str:
        done = subprocess.run(
            ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            raise RuntimeError(f"cluster.sh {' '.join(args)}: {done.stderr.strip()[-500:]}")
        return done.stdout

    def start(self) -> None:
        self._run("start", timeout=300)

    def stop(self) -> None:
        self._run("stop")

    def kill(self, n: int) -> None:
        self._run("kill", str(n))

    def restart(self, n: int) -> None:
        self._run("restart", str(n))

    def ctl(self, n: int, *args: str) -> str:
        return self._run("ctl", str(n), *args)

    def _json(self, n: int, *args: str) -> list[dict[str, Any]]:
        out = self.ctl(n, *args, "-q", "--formatter", "json")
        rows: list[dict[str, Any]] = json.loads(out or "[]")
        return rows

    def leaders(self, prefix: str, via: int = 1) -> dict[str, str]:
        """queue name -> node leading it (quorum queues of one AMQP_PREFIX)."""
        rows = self._json(via, "list_queues", "name", "leader")
        return {r["name"]: r["leader"] for r in rows if r["name"].startswith(prefix + ".")}

    def busiest_node(self, prefix: str, via: int = 1) -> int:
        """The node leading most of the prefix's shard queues."""
        counts = Counter(
            node for name, node in self.leaders(prefix, via).items() if ".contacts." in name
        )
        node = counts.most_common(1)[0][0]
        return int(node.split("@")[0].removeprefix("crmt"))

    def active_consumers(self, prefix: str, via: int = 1) -> dict[str, list[str]]:
        """shard queue -> connection names of its *active* consumers, as the broker sees it
        (single-active-consumer: never more than one)."""
        connections = {
            row["pid"]: _connection_name(row["client_properties"])
            for row in self._json(via, "list_connections", "pid", "client_properties")
        }
        channels = {
            row["pid"]: row["connection"]
            for row in self._json(via, "list_channels", "pid", "connection")
        }
        result: dict[str, list[str]] = {}
        for row in self._json(via, "list_consumers", "queue_name", "channel_pid", "active"):
            name = row["queue_name"]
            if not name.startswith(prefix + ".contacts."):
                continue
            result.setdefault(name, [])
            if row["active"]:
                connection = channels.get(row["channel_pid"], "?")
                result[name].append(connections.get(connection, "?"))
        return result


def _connection_name(properties: list[list[Any]]) -> str:
    for key, _kind, value in properties:
        if key == "connection_name":
            return str(value)
    return "?"
