"""AMQP_URL with several cluster nodes: parsed once, into one plain URL per node.

Two spellings are accepted, as other RabbitMQ clients write them:

- hosts in one URL: `amqp://user:pass@h1,h2:5673,h3/vhost?heartbeat=30`
- a comma-separated list of URLs: `amqp://user:pass@h1/vhost,amqp://user:pass@h2/vhost`

Pure parsing (no I/O); `ValueError` names what is wrong without echoing a password.
"""

from __future__ import annotations

import re

from yarl import URL

_SCHEMES = ("amqp://", "amqps://")
# scheme, optional userinfo, the host list, the rest (path, query)
_MULTI_HOST = re.compile(r"^(amqps?://)(?:([^@/?#]*)@)?([^/?#]*)(.*)$", re.DOTALL)


def node_urls(amqp_url: str) -> list[str]:
    """One URL per node, in the order given (the caller picks where to start)."""
    text = amqp_url.strip()
    if not text.startswith(_SCHEMES):
        raise ValueError("must be an amqp:// or amqps:// URL")
    pieces = [piece.strip() for piece in text.split(",")]
    if len(pieces) > 1 and any("://" in piece for piece in pieces[1:]):
        urls = pieces
    else:
        match = _MULTI_HOST.match(text)
        if match is None:  # pragma: no cover - the pattern matches any amqp:// text
            raise ValueError("is not a URL")
        scheme, userinfo, hosts, rest = match.groups()
        auth = f"{userinfo}@" if userinfo is not None else ""
        urls = [f"{scheme}{auth}{host.strip()}{rest}" for host in hosts.split(",")]
    for index, url in enumerate(urls, 1):
        _check(url, index, len(urls))
    return urls


def _check(url: str, index: int, total: int) -> None:
    where = f"node {index} of {total} " if total > 1 else ""
    if not url.startswith(_SCHEMES):
        raise ValueError(f"{where}must start with amqp:// or amqps://")
    try:
        parsed = URL(url)
        port = parsed.port  # raises on a port that is not a number
    except ValueError:
        raise ValueError(f"{where}is not a valid URL (host, port or %-escapes)") from None
    if not parsed.host:
        raise ValueError(f"{where}has no host name")
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"{where}has port {port}, expected 1-65535")
    if parsed.path.count("/") > 1:
        raise ValueError(f"{where}has a vhost with '/': write it as %2F")


def redact(url: str) -> str:
    """The URL without its password, for logs and error lines."""
    try:
        parsed = URL(url)
    except ValueError:
        return "<unparsable URL>"
    return str(parsed.with_password("***")) if parsed.password else str(parsed)
