"""Imports point one way: entry points → bootstrap → use cases → adapters → kernel → domain.

Every module of `service`, `handlers` and `consumers` is parsed with `ast`; every import
counts, at module level, under `if TYPE_CHECKING:` or inside a function (a function-local
import is still an arrow). ARCHITECTURE.md names the rooms.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGES = ("service", "handlers", "consumers")

# Rank of each room: a module may import its own room or a lower one.
DOMAIN, KERNEL, ADAPTERS, USECASES, BOOTSTRAP, ENTRY, CLI = range(7)
_ROOMS: tuple[tuple[str, int], ...] = (
    ("service.domain", DOMAIN),
    ("service.adapters", ADAPTERS),
    ("service.usecases", USECASES),
    ("service.bootstrap", BOOTSTRAP),
    ("service.cli", CLI),
    ("service.__main__", CLI),
    ("handlers", ENTRY),
    ("consumers", ENTRY),
    ("service", KERNEL),  # config, logs, metrics, errors: the rest of service/'s root
)
# What the pure domain may import besides itself.
DOMAIN_ALLOWED = {"msgspec"}


def room(module: str) -> tuple[str, int]:
    for prefix, rank in _ROOMS:
        if module == prefix or module.startswith(prefix + "."):
            return prefix, rank
    raise ValueError(f"{module} is in no room")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


def imports_of(module: str, source: str, known: Iterable[str]) -> set[str]:
    """Every module `module` imports (stdlib and third-party included), wherever it stands."""
    known = set(known)
    package = module if f"{module}.__init__" in known else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # `from handlers import dialogs` imports the module handlers.dialogs
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return found


def graph(modules: Mapping[str, Path]) -> dict[str, set[str]]:
    known = set(modules) | {f"{m}.__init__" for m, p in modules.items() if p.stem == "__init__"}
    return {
        name: imports_of(name, path.read_text("utf-8"), known) for name, path in modules.items()
    }


def wrong_way(edges: Mapping[str, set[str]]) -> list[str]:
    """Imports from a lower room to a higher one, between entry points, or out of the domain."""
    problems = []
    for source, targets in edges.items():
        source_room, source_rank = room(source)
        for target in sorted(targets):
            top = target.partition(".")[0]
            if top not in PACKAGES:
                if source_rank == DOMAIN and top not in DOMAIN_ALLOWED and not _stdlib(top):
                    problems.append(f"{source} -> {target} (the domain does no I/O)")
                continue
            target_room, target_rank = room(target)
            if target_rank > source_rank:
                problems.append(f"{source} -> {target} ({source_room} is below {target_room})")
            elif source_rank == target_rank == ENTRY and target_room != source_room:
                problems.append(f"{source} -> {target} (entry points import no other)")
    return problems


def cycles(edges: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in edges:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1 or node in edges.get(node, ()):
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(groups)


def _stdlib(name: str) -> bool:
    import sys

    return name in sys.stdlib_module_names or name == "__future__"


def test_every_module_sits_in_a_room() -> None:
    for name in project_modules():
        room(name)


def test_imports_point_downward() -> None:
    assert wrong_way(graph(project_modules())) == []


def test_no_import_cycle() -> None:
    # A package importing its own modules (handlers/__init__ and friends) counts too.
    assert cycles(graph(project_modules())) == []


def test_the_checks_catch_a_bad_edge() -> None:
    # The same checks, fed a synthetic graph with each kind of wrong arrow.
    edges = {
        "service.usecases.pipeline": {"handlers.http_app", "service.domain.facts"},
        "service.domain.facts": {"asyncpg", "msgspec", "datetime"},
        "service.config": {"service.adapters.broker.publisher"},
        "handlers.dialogs": {"consumers.contacts", "handlers.http_app"},
        "handlers.http_app": {"handlers.dialogs"},
        "consumers.contacts": set(),
        "service.adapters.broker.publisher": set(),
    }
    assert wrong_way(edges) == [
        "service.usecases.pipeline -> handlers.http_app (service.usecases is below handlers)",
        "service.domain.facts -> asyncpg (the domain does no I/O)",
        "service.config -> service.adapters.broker.publisher (service is below service.adapters)",
        "handlers.dialogs -> consumers.contacts (entry points import no other)",
    ]
    assert cycles(edges) == [["handlers.dialogs", "handlers.http_app"]]


def test_a_function_local_import_is_an_arrow() -> None:
    source = "def late():\n    from handlers.http_app import make_app\n"
    assert imports_of("service.usecases.x", source, {"handlers.http_app"}) == {"handlers.http_app"}
    typed = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from consumers import contacts\n"
    )
    assert "consumers.contacts" in imports_of("service.cli.x", typed, {"consumers.contacts"})
