"""Rules analyzer: time per character of one message, 1k to 1M characters.

The text repeats money amounts, prices per lead and dates — the shapes whose old budget
pass sliced the rest of the message per amount (quadratic). A linear analyzer keeps time
per character flat; figures are ratios against the 1k-character run of the same process.
Also: the longest the event loop stalls while a 1M-character message is analysed through
`RulesAnalyzer.analyze` (worker thread), against a plain 10 ms ticker.

    python -m bench rules_linear
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

from service.adapters.analyzers.rules import RulesAnalyzer
from service.config import Settings
from service.domain.dialog import Contact, Dialog, DialogMessage
from service.domain.text_bounds import bounded_dialog

SIZES = (1_000, 10_000, 100_000, 1_000_000)
UNIT = (
    "бюджет 500 тыс тенге в месяц, по 5000 за лид, созвон завтра в 15:00, "
    "$2000 на рекламу, владелец клиники. "
)


def _dialog(text: str) -> Dialog:
    t0 = datetime(2026, 9, 1, tzinfo=UTC)
    texts = ["Здравствуйте, я владелец клиники", "Какой у вас бюджет?", text]
    messages = [
        DialogMessage(
            id=f"m{i}", from_me=i == 1, timestamp=t0 + timedelta(minutes=i), text=t, type="c"
        )
        for i, t in enumerate(texts)
    ]
    return Dialog(
        instance="bench",
        contact=Contact(phone="77010000000", remote_jid="77010000000@s.whatsapp.net"),
        messages=messages,
        incoming_count=2,
        outgoing_count=1,
        first_message_at=t0,
        last_message_at=messages[-1].timestamp,
    )


def _per_char(analyzer: RulesAnalyzer, size: int) -> float:
    text = (UNIT * (size // len(UNIT) + 1))[:size]
    dialog = _dialog(text)
    runs = max(1, 200_000 // size)
    started = time.process_time()
    for _ in range(runs):
        analyzer.extract(dialog)
    return (time.process_time() - started) / runs / size


async def _stall(analyzer: RulesAnalyzer, size: int, bound: bool) -> tuple[float, float]:
    text = (UNIT * (size // len(UNIT) + 1))[:size]
    dialog = _dialog(text)
    if bound:  # as the pipeline hands it over (MAX_MESSAGE_CHARS, ANALYSIS_MAX_CHARS)
        settings = Settings()
        dialog = bounded_dialog(
            dialog,
            message_chars=settings.max_message_chars,
            dialog_chars=settings.analysis_max_chars,
        )
    started = time.perf_counter()
    task = asyncio.ensure_future(analyzer.analyze(dialog))
    longest, last = 0.0, time.perf_counter()
    while not task.done():
        await asyncio.sleep(0.01)
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    await task
    return time.perf_counter() - started, longest


def main() -> int:
    analyzer = RulesAnalyzer(timeout=600)
    base = _per_char(analyzer, SIZES[0])
    print(f"{'characters':>12} {'µs/char':>9} {'vs 1k':>7}")
    worst = 1.0
    for size in SIZES:
        per = base if size == SIZES[0] else _per_char(analyzer, size)
        worst = max(worst, per / base)
        print(f"{size:>12,} {per * 1e6:>9.2f} {per / base:>6.2f}x")
    for bound, what in ((False, "unbounded"), (True, "as the pipeline bounds it")):
        took, stall = asyncio.run(_stall(analyzer, SIZES[-1], bound))
        print(
            f"1M-character message, {what}: analyze() {took:.2f} s, "
            f"longest event-loop stall {stall * 1000:.0f} ms"
        )
    asyncio.run(analyzer.close())
    # Flat means within a small factor (caches and allocation grow a little with size).
    return 0 if worst < 3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
