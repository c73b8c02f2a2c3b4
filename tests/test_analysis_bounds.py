"""Analysis cost is bounded and never holds the event loop.

A contact can send a 65,536-character WhatsApp message (an API client: more). The rules
analyzer's pattern passes are linear in the text, the pipeline cuts what any analyzer sees
per message and per dialog, and the CPU work runs on worker threads: the loop keeps
answering (heartbeats, webhooks, /health) while a worst-case dialog is analysed.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

from service.adapters.analyzers.rules import RulesAnalyzer
from service.domain.dialog import Dialog, DialogMessage
from tests.test_prompt import make_dialog

# Money amounts repeated: what made the old budget pass quadratic.
AMOUNTS = "бюджет 500 тыс тенге в месяц, по 5000 за лид, "


def dialog_of(texts: list[str]) -> Dialog:
    """Client and manager taking turns, the client first."""
    return make_dialog([(i % 2 == 1, text) for i, text in enumerate(texts)])


def huge(chars: int) -> str:
    return (AMOUNTS * (chars // len(AMOUNTS) + 1))[:chars]


async def longest_stall(work: asyncio.Future[object] | asyncio.Task[object]) -> float:
    """The longest the loop went without running a 10 ms ticker while `work` ran."""
    gaps: list[float] = []
    last = time.perf_counter()
    while not work.done():
        await asyncio.sleep(0.01)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    await work
    return max(gaps, default=0.0)


async def test_rules_analysis_runs_off_the_event_loop() -> None:
    analyzer = RulesAnalyzer()
    try:
        # 150k characters of amounts in one message: a quarter second of CPU here, and
        # seconds on the loop before (quadratic there).
        dialog = dialog_of(["Здравствуйте, я владелец клиники", "Какой бюджет?", huge(150_000)])
        task = asyncio.ensure_future(analyzer.analyze(dialog))
        stall = await longest_stall(task)
    finally:
        await analyzer.close()
    # On the loop this was the whole analysis (seconds); off it, scheduler noise.
    assert stall < 1.0, f"event loop held for {stall:.2f} s"


async def test_analysis_timeout_is_a_transient_error() -> None:
    from service.adapters.analyzers.base import AnalyzerUnavailableError

    analyzer = RulesAnalyzer(timeout=0.001)
    try:
        dialog = dialog_of(["Здравствуйте", "Какой бюджет?", huge(200_000)])
        try:
            await analyzer.analyze(dialog)
        except AnalyzerUnavailableError as exc:
            assert "ANALYSIS_TIMEOUT" in str(exc)
        else:
            raise AssertionError("a 1 ms bound did not stop a 200k-character analysis")
    finally:
        await analyzer.close()


def test_amount_pass_is_linear() -> None:
    """Time per character of a message of repeated amounts, 16k vs 128k characters."""
    analyzer = RulesAnalyzer()
    per_char = []
    for size in (16_000, 128_000):
        dialog = dialog_of(["Здравствуйте, я владелец клиники", "Какой бюджет?", huge(size)])
        started = time.process_time()
        analyzer.extract(dialog)
        per_char.append((time.process_time() - started) / size)
    # Quadratic: 8x the size costs 8x per character (64x in all); linear: about the same.
    assert per_char[1] < per_char[0] * 3, per_char


def test_pipeline_bounds_text_per_message_and_per_dialog() -> None:
    from service.domain.text_bounds import bounded_dialog

    dialog = dialog_of(["а" * 10_000, "б" * 3_000, "в" * 3_000, "г" * 50_000])
    cut = bounded_dialog(dialog, message_chars=4096, dialog_chars=9000)
    assert [len(m.text) for m in cut.messages] == [3000, 4096]  # newest kept, each cut
    assert [m.id for m in cut.messages] == ["m2", "m3"]
    assert cut.incoming_count == dialog.incoming_count  # counts describe the whole dialog
    small = dialog_of(["привет", "здравствуйте"])
    assert bounded_dialog(small, message_chars=4096, dialog_chars=9000) is small


class Recording:
    """An analyzer that keeps what it was given (the rules analyzer answers)."""

    name = "recording"

    def __init__(self) -> None:
        self.seen: list[Dialog] = []
        self.inner = RulesAnalyzer()

    async def analyze(self, dialog: Dialog) -> object:
        self.seen.append(dialog)
        return await self.inner.analyze(dialog)

    async def close(self) -> None:
        await self.inner.close()


async def test_the_pipeline_gives_analyzers_bounded_text(service_settings: object) -> None:
    import uuid

    from service.bootstrap.builders import app_context
    from service.config import Settings
    from service.usecases.pipeline import Pipeline
    from tests.harness import INSTANCE

    assert isinstance(service_settings, Settings)
    account = uuid.uuid4()
    recording = Recording()
    async with app_context(service_settings) as ctx:
        assert ctx.reader is not None and ctx.store is not None
        pipeline = Pipeline(service_settings, ctx.reader, ctx.store, recording, ctx.metrics)  # type: ignore[arg-type]
        now = datetime.now(UTC)
        texts = ["Здравствуйте", huge(1_000_000), "Какой бюджет?", huge(200_000), "Ок"]
        extra = [
            DialogMessage(
                id=f"x{i}",
                from_me=False,
                timestamp=now - timedelta(seconds=9 - i),
                text=text,
                type="conversation",
            )
            for i, text in enumerate(texts)
        ]
        outcome = await pipeline.analyze_contact(
            INSTANCE, "77010000099", account, extra_messages=extra
        )
    await recording.close()
    assert outcome.outcome == "analyzed"
    (seen,) = recording.seen
    lengths = [len(m.text) for m in seen.messages]
    assert max(lengths) <= service_settings.max_message_chars
    assert sum(lengths) <= service_settings.analysis_max_chars
    assert seen.messages[-1].text == "Ок"  # the newest is always there
