"""Cache-stable prompts: a growing dialog is re-sent append-only, so the provider's prefix
cache covers all but the new messages; past the budget, old messages go in large steps."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

from service.adapters.analyzers.openai_analyzer import OpenAIAnalyzer
from service.adapters.analyzers.prompt import DIALOG_OPEN, build_prompt
from service.adapters.analyzers.rules import RulesAnalyzer
from service.config import Settings
from service.domain.dialog import Contact, Dialog, DialogMessage, dialog_of
from tests.fakes.openai_server import FakeOpenAI

T0 = datetime(2026, 9, 1, 8, 0, tzinfo=UTC)


def grown(count: int, *, window: int | None = None, phone: str = "77010000009") -> Dialog:
    """The first `count` messages of one long dialog; the reader hands over the newest
    `window` of them, with whole-history counts (as `EvolutionReader.dialog` does)."""
    messages = [
        DialogMessage(
            id=f"{phone}-{i}",
            from_me=i % 2 == 1,
            timestamp=T0 + timedelta(minutes=3 * i),
            text=f"сообщение {i}: " + ("у нас клиника, бюджет обсудим позже " * (1 + i % 3)),
            type="conversation",
        )
        for i in range(count)
    ]
    contact = Contact(phone=phone, remote_jid=f"{phone}@s.whatsapp.net")
    return dialog_of("inst", contact, messages, window=window)


def first_line(dialog: Dialog, settings: Settings) -> str:
    user = build_prompt(dialog, settings).user
    return user.split("\n")[1]


async def test_re_analyses_of_a_growing_dialog_are_mostly_cached() -> None:
    async with FakeOpenAI() as fake:
        settings = Settings(openai_api_key="sk-test", openai_base_url=fake.base_url)
        analyzer = OpenAIAnalyzer(settings, fallback=RulesAnalyzer())
        try:
            for count in range(4, 40, 2):
                await analyzer.analyze(grown(count))
        finally:
            await analyzer.close()
    re_analyses = fake.requests[1:]
    shares = [r.prefix_tokens / r.prompt_tokens for r in re_analyses]
    assert min(shares) >= 0.8, shares
    # Append-only: everything of the previous request up to its counts is a prefix.
    for before, after in zip(fake.requests, fake.requests[1:], strict=False):
        head = before.user_prompt.split("</dialog>")[0]
        assert after.user_prompt.startswith(head)


def test_past_the_budget_old_messages_go_in_large_steps() -> None:
    settings = Settings(max_dialog_chars=3000, max_dialog_messages=200)
    starts = [first_line(grown(count), settings) for count in range(10, 200)]
    changes = sum(1 for a, b in itertools.pairwise(starts) if a != b)
    # Dropping the oldest message whenever one arrives would change the start ~180 times.
    assert changes <= 20, changes
    for count in range(10, 200, 7):
        prompt = build_prompt(grown(count), settings)
        block = prompt.user.split("</dialog>")[0][len(DIALOG_OPEN) :]
        assert len(block) <= settings.max_dialog_chars + 1
        assert prompt.kept_messages >= 5  # a step never leaves too little


def test_the_reader_window_sliding_does_not_move_the_start_every_message() -> None:
    # The reader returns only the newest MAX_DIALOG_MESSAGES: the start still sits on a
    # grid of whole-history message numbers.
    settings = Settings(max_dialog_chars=100_000, max_dialog_messages=40)
    starts = [first_line(grown(count, window=40), settings) for count in range(41, 200)]
    changes = sum(1 for a, b in itertools.pairwise(starts) if a != b)
    assert changes <= 159 // 10 + 1, changes
    assert all(build_prompt(grown(c, window=40), settings).kept_messages <= 40 for c in (41, 99))
