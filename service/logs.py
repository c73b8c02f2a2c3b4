"""Logging: loguru as the single sink, JSON lines by default, stdlib logging routed in.

Message text and phone numbers are logged only at DEBUG; above it, contacts appear as a
short keyed hash (`contact_hash`, HMAC with CONTACT_HASH_SECRET) so lines about one contact
can be correlated without the number.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
from loguru import logger

if TYPE_CHECKING:
    from loguru import Message, Record

    from service.config import Settings

_json = msgspec.json.Encoder()


class ContactRef:
    """A contact in a log line's `contact_hash` field: the sink writes it as a keyed hash.

    The key is set once by `setup_logging`; a phone number space is small enough that an
    unkeyed hash is reversed by trying every number, so the plain value never shows.
    """

    __slots__ = ("phone",)

    def __init__(self, phone: str) -> None:
        self.phone = phone

    def __str__(self) -> str:
        return "contact"  # no sink configured: nothing about the number

    __repr__ = __str__


def contact_hash(phone: str) -> ContactRef:
    """The contact for a log line's `contact_hash` field (keyed hash, see `ContactRef`)."""
    return ContactRef(phone)


def keyed_contact_hash(key: bytes, phone: str) -> str:
    return hmac.new(key, phone.encode(), hashlib.sha256).hexdigest()[:16]


def contact_hash_key(settings: Settings) -> bytes:
    """CONTACT_HASH_SECRET; else a key derived from the other secrets (stable across
    restarts); else a random one for this process."""
    if settings.contact_hash_secret:
        return settings.contact_hash_secret.encode()
    material = "\0".join(sorted(settings.secrets().values()))
    if material:
        return hmac.new(material.encode(), b"crm-backend contact hash", hashlib.sha256).digest()
    return secrets.token_bytes(32)


def _hash_contacts(key: bytes) -> Callable[[Record], None]:
    def patch(record: Record) -> None:
        ref = record["extra"].get("contact_hash")
        if isinstance(ref, ContactRef):
            record["extra"]["contact_hash"] = keyed_contact_hash(key, ref.phone)

    return patch


def _json_sink(message: Message) -> None:
    record: Record = message.record
    line: dict[str, Any] = {
        "time": record["time"].isoformat(),
        "level": record["level"].name,
        "message": record["message"],
        "logger": record["name"],
    }
    for key, value in record["extra"].items():
        line[key] = value if isinstance(value, str | int | float | bool | None) else str(value)
    if record["exception"] is not None:
        exc = record["exception"]
        line["exception"] = f"{exc.type.__name__ if exc.type else 'Exception'}: {exc.value}"
    sys.stdout.write(_json.encode(line).decode() + "\n")
    sys.stdout.flush()


class _InterceptHandler(logging.Handler):
    """Send stdlib records (aiohttp, aio-pika, asyncpg) to loguru with their level."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, record.getMessage())


def setup_logging(settings: Settings) -> None:
    logger.remove()
    logger.configure(patcher=_hash_contacts(contact_hash_key(settings)))
    if settings.log_format == "pretty":
        logger.add(
            sys.stderr,
            level=settings.log_level,
            format="<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
            "{message} <dim>{extra}</dim>",
        )
    else:
        logger.add(_json_sink, level=settings.log_level)
    logging.basicConfig(handlers=[_InterceptHandler()], level=logging.INFO, force=True)
    # Access logs are written by our own lean middleware; aio-pika's reconnect chatter is
    # useful only when debugging.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    debug = settings.log_level in ("TRACE", "DEBUG")
    # openai's HTTP client is httpx2: at INFO it logs a line per request.
    for noisy in ("aio_pika", "httpx", "httpcore", "httpx2", "httpcore2", "hpack"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)
    # aiormq logs every failed connect at ERROR with a traceback; aio-pika's own reconnect
    # warning (and our error line) say the same in one line.
    logging.getLogger("aiormq").setLevel(logging.DEBUG if debug else logging.CRITICAL)
