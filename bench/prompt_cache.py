"""Prompt caching on re-analyses: how much of each re-sent prompt the provider can cache.

A contact is re-analysed each time its dialog grows. This replays growing dialogs (the
development dialogs, extended to `--messages` messages each) through the real analyzer
and `openai` client against the OpenAI-compatible test server, which computes each
request's longest common prefix with the previous request of the same contact
(`prompt_cache_key`). Prints, per scenario:

- the cacheable share of prompt tokens on re-analyses (target >= 80 %), and the share
  billed as cached under OpenAI's rules (prefixes from 1,024 tokens, 128-token steps);
- cost per lead per month at the price table (`service/adapters/analyzers/prices.py`), assuming a
  lead's replayed dialog is one month of it, against the same calls with nothing cached
  (the baseline of this run).

    python -m bench prompt_cache [-- --leads 20 --messages 60]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.adapters.analyzers.base import TokenUsage
from service.adapters.analyzers.openai_analyzer import OpenAIAnalyzer
from service.adapters.analyzers.prices import EST_COMPLETION_TOKENS, PRICES_AS_OF, price_of
from service.adapters.analyzers.rules import RulesAnalyzer
from service.cli.demo import load_sample_dialogs
from service.config import Settings
from service.domain.dialog import Contact, Dialog, DialogMessage, dialog_of
from service.domain.facts import empty_facts
from tests.fakes.openai_server import FakeOpenAI, RecordedRequest

MODELS = ("gpt-6.1-terra", "gpt-6-luna")
TARGET = 0.80
FIXED = empty_facts("qualified")


def growing(raw: dict[str, object], length: int) -> list[DialogMessage]:
    """The dialog's messages, continued by repeating them a day later, to `length`."""
    base = [m for m in raw["messages"]]  # type: ignore[attr-defined]
    messages: list[DialogMessage] = []
    for i in range(length):
        source = base[i % len(base)]
        when = datetime.fromisoformat(source["ts"].replace("Z", "+00:00"))
        messages.append(
            DialogMessage(
                id=f"{raw['id']}-{i}",
                from_me=source["from_me"],
                timestamp=when + timedelta(days=i // len(base)),
                text=source["text"],
                type="conversation",
            )
        )
    return messages


def snapshot(raw: dict[str, object], messages: list[DialogMessage], window: int) -> Dialog:
    phone = str(raw["contact"]["phone"])  # type: ignore[index]
    contact = Contact(phone=phone, remote_jid=f"{phone}@s.whatsapp.net")
    return dialog_of("bench", contact, messages, window=window)


async def scenario(name: str, leads: int, length: int, settings_extra: dict[str, object]) -> bool:
    dialogs = load_sample_dialogs()[:leads]
    async with FakeOpenAI(facts=lambda _: FIXED) as fake:
        settings = Settings(
            openai_api_key="sk-bench", openai_base_url=fake.base_url, **settings_extra
        )
        analyzer = OpenAIAnalyzer(settings, fallback=RulesAnalyzer())
        firsts: set[int] = set()
        try:
            for raw in dialogs:
                messages = growing(raw, length)
                first = True
                for count in range(3, length + 1):
                    if messages[count - 1].from_me:
                        continue  # re-analysed when the client writes
                    if first:
                        firsts.add(len(fake.requests))
                        first = False
                    await analyzer.analyze(
                        snapshot(raw, messages[:count], settings.max_dialog_messages)
                    )
        finally:
            await analyzer.close()
    re_sent = [r for i, r in enumerate(fake.requests) if i not in firsts]
    prompt = sum(r.prompt_tokens for r in re_sent)
    cacheable = sum(r.prefix_tokens for r in re_sent) / prompt
    billed = sum(_billed_cached(r) for r in re_sent) / prompt
    calls = len(fake.requests)
    print(
        f"{name}: {leads} leads x {length} messages, {calls} analyses "
        f"({calls / leads:.0f} per lead), {prompt / len(re_sent):.0f} prompt tokens per "
        f"re-analysis; cacheable {cacheable:.1%} (target >= {TARGET:.0%}), billed as cached "
        f"{billed:.1%}"
    )
    for model in MODELS:
        price = price_of(model)
        assert price is not None
        usage = TokenUsage(
            prompt_tokens=sum(r.prompt_tokens for r in fake.requests),
            cached_tokens=sum(_billed_cached(r) for r in fake.requests),
            completion_tokens=EST_COMPLETION_TOKENS * calls,
        )
        cold = TokenUsage(
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens
        )
        with_cache = price.cost(usage) / leads
        without = price.cost(cold) / leads
        print(
            f"  {model} (prices of {PRICES_AS_OF}): ${with_cache:.4f} per lead per month, "
            f"{with_cache / without:.2f} x the cost with nothing cached (${without:.4f}); "
            f"{EST_COMPLETION_TOKENS} output tokens per call assumed"
        )
    return cacheable >= TARGET


def _billed_cached(request: RecordedRequest) -> int:
    prefix = request.prefix_tokens
    return 0 if prefix < 1024 else prefix - (prefix - 1024) % 128


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench prompt_cache")
    parser.add_argument("--leads", type=int, default=20)
    parser.add_argument("--messages", type=int, default=60)
    args = parser.parse_args(argv or [])
    ok = asyncio.run(scenario("within MAX_DIALOG_CHARS", args.leads, args.messages, {}))
    ok &= asyncio.run(
        scenario(
            "past MAX_DIALOG_CHARS=3000",
            args.leads,
            args.messages * 2,
            {"max_dialog_chars": 3000},
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
