"""Logging: loguru as the single sink, JSON lines by default, stdlib logging routed in.

Message text and phone numbers are logged only at DEBUG; above it, contacts appear as a
short hash (`contact_hash`) so lines about one contact can be correlated without the number.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from typing import TYPE_CHECKING, Any

import msgspec
from loguru import logger

if TYPE_CHECKING:
    from loguru import Message, Record

    from service.config import Settings

_json = msgspec.json.Encoder()


def contact_hash(phone: str) -> str:
    """Stable, non-reversible-at-a-glance id of a contact for logs above DEBUG."""
    return hashlib.blake2s(phone.encode(), digest_size=6).hexdigest()


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
    for noisy in ("aio_pika", "httpx", "httpcore", "hpack"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)
    # aiormq logs every failed connect at ERROR with a traceback; aio-pika's own reconnect
    # warning (and our error line) say the same in one line.
    logging.getLogger("aiormq").setLevel(logging.DEBUG if debug else logging.CRITICAL)
