"""A progress line on stderr for the backfill: count, rate, ETA, errors."""

from __future__ import annotations

import time
from typing import TextIO

from service.usecases.backfill import BackfillStats


class Progress:
    def __init__(self, stream: TextIO, interval: float = 0.2) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        # Not a terminal (CI, a log file): a line every few seconds instead of redraws.
        self._interval = interval if self._tty else 5.0
        self._started = time.monotonic()
        self._shown = 0.0
        self.last: BackfillStats | None = None
        self._expected: int | None = None

    def update(self, stats: BackfillStats, expected: int | None = None) -> None:
        self.last = stats
        self._expected = expected
        now = time.monotonic()
        if now - self._shown >= self._interval:
            self._shown = now
            self._draw(now)

    def finish(self) -> None:
        if self.last is not None:
            self._draw(time.monotonic())
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()

    def _draw(self, now: float) -> None:
        stats = self.last
        if stats is None:
            return
        done = stats.analyzed + stats.new_leads + stats.skipped + stats.errors
        elapsed = max(now - self._started, 1e-6)
        rate = done / elapsed
        total = self._expected or stats.total
        eta = f"{(total - done) / rate:5.0f}s" if rate > 0 and total >= done else "    ?"
        width = 24
        filled = int(width * done / total) if total else 0
        bar = "#" * filled + "." * (width - filled)
        line = (
            f"[{bar}] {done}/{total} contacts  {rate:6.1f}/s  ETA {eta}  "
            f"analyzed {stats.analyzed}  new {stats.new_leads}  "
            f"unchanged {stats.skipped}  errors {stats.errors}"
        )
        self._stream.write(("\r" + line) if self._tty else line + "\n")
        self._stream.flush()
