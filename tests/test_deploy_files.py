"""Structure of the deployment files (Docker does not run on this machine)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec
import yaml

from service.config import Settings

ROOT = Path(__file__).parent.parent


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_compose_services_and_wiring() -> None:
    services = compose()["services"]
    assert {"postgres", "rabbitmq", "evolution", "crm-backend"} <= set(services)
    crm = services["crm-backend"]
    assert crm["command"] == ["run"]
    assert "8084:8084" in crm["ports"]
    env = crm["environment"]
    for name in ("AMQP_URL", "RESULTS_DATABASE_URL", "EVOLUTION_DATABASE_URL", "API_TOKEN"):
        assert name in env, name
    assert "@rabbitmq:5672" in env["AMQP_URL"]
    assert "@postgres:5432/evolution" in env["EVOLUTION_DATABASE_URL"]
    assert env["EVOLUTION_DB_SCHEMA"] == "evolution_api"
    assert set(crm["depends_on"]) == {"postgres", "rabbitmq"}
    assert crm["labels"]["logging"] == "promtail"
    evo = services["evolution"]["environment"]
    assert evo["WEBHOOK_GLOBAL_URL"].startswith("http://crm-backend:8084/webhooks/evolution")
    assert evo["WEBHOOK_EVENTS_MESSAGES_UPSERT"] == "true"
    assert evo["WEBHOOK_EVENTS_SEND_MESSAGE"] == "true"
    assert "schema=evolution_api" in evo["DATABASE_CONNECTION_URI"]
    # The results database is created on the compose PostgreSQL's first start.
    init = [v for v in services["postgres"]["volumes"] if "docker-entrypoint-initdb.d" in v]
    assert init and (ROOT / init[0].split(":")[0]).is_file()


def test_compose_variables_are_documented() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    used = set(re.findall(r"\$\{([A-Z_]+)", text))
    example = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^([A-Z_]+)=", example, flags=re.M))
    assert used <= documented, used - documented


def test_env_example_lists_every_setting() -> None:
    example = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^([A-Z_]+)=", example, flags=re.M))
    names = {f.name.upper() for f in msgspec.structs.fields(Settings)}
    assert names <= documented, names - documented
    # Each variable has a comment line above it (or is part of a commented group).
    lines = example.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[A-Z_]+=", line):
            above = lines[:i]
            assert any(prev.startswith("#") for prev in above[-6:]), line


def test_dockerfile_shape() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, flags=re.M)) >= 2  # multi-stage
    assert re.search(r"^USER (?!root)\w+", text, flags=re.M)
    assert "HEALTHCHECK" in text and "/health" in text
    assert re.search(r'^ENTRYPOINT \["crm-backend"\]', text, flags=re.M)
    # The SQL ships inside the package: no copy step, no directory to point at.
    assert "migrations" not in text and "CRM_MIGRATIONS_DIR" not in text
