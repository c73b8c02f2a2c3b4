"""Which hosts and addresses an endpoint may reach (NOTIFY_ALLOWED_HOSTS, NOTIFY_DENY_PRIVATE).

By default any http(s) target is allowed, loopback included (a receiver on the same host,
a relay in the same compose project). In production the allow-list names the hosts
endpoints may use, and denying private ranges refuses every address that is not public —
checked on every connect, after DNS, so a public name that resolves to an inner address
is refused too.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from service.config import Settings


class TargetRefusedError(Exception):
    """The target is outside what NOTIFY_ALLOWED_HOSTS / NOTIFY_DENY_PRIVATE allow."""


def _is_private(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


class TargetPolicy:
    def __init__(self, allowed_hosts: list[str], deny_private: bool) -> None:
        self.allowed_hosts = [h.lower().rstrip(".") for h in allowed_hosts]
        self.deny_private = deny_private

    @classmethod
    def from_settings(cls, settings: Settings) -> TargetPolicy:
        return cls(settings.notify_allowed_host_list(), settings.notify_deny_private)

    def check_url(self, url: str) -> None:
        """Raise TargetRefusedError for a URL whose host the policy refuses as written."""
        host = (urlsplit(url).hostname or "").lower().rstrip(".")
        if self.allowed_hosts and not any(self._matches(host, p) for p in self.allowed_hosts):
            raise TargetRefusedError(
                f"host {host!r} is not in NOTIFY_ALLOWED_HOSTS ({', '.join(self.allowed_hosts)})"
            )
        if self.deny_private and (host == "localhost" or (_is_ip(host) and _is_private(host))):
            raise TargetRefusedError(
                f"host {host!r} is a private or loopback address (NOTIFY_DENY_PRIVATE=true)"
            )

    @staticmethod
    def _matches(host: str, pattern: str) -> bool:
        if pattern.startswith("*."):
            return host.endswith(pattern[1:])
        return host == pattern

    def resolver(self) -> AbstractResolver:
        return _PolicyResolver(self) if self.deny_private else DefaultResolver()


class _PolicyResolver(AbstractResolver):
    """DNS answers with a private address are refused (a name may point anywhere)."""

    def __init__(self, policy: TargetPolicy) -> None:
        self._policy = policy
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if any(_is_private(result["host"]) for result in results):
            raise OSError(f"{host} resolves to a private address (NOTIFY_DENY_PRIVATE=true)")
        return results

    async def close(self) -> None:
        await self._inner.close()
