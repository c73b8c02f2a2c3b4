"""Model prices: one dated table, used by `backfill --dry-run`, `eval` and the benchmarks.

Prices change and models are retired: update the table and its date together. USD per
1M tokens. `cache_write` is what a prompt token costs the first time it is cached (OpenAI
bills it as plain input; providers that charge a cache-write premium set it higher).
"""

from __future__ import annotations

import msgspec

from service.adapters.analyzers.base import TokenUsage

PRICES_AS_OF = "2026-12-01"


class ModelPrice(msgspec.Struct, frozen=True, kw_only=True):
    input: float
    cached_input: float
    cache_write: float
    output: float
    note: str = ""

    def cost(self, usage: TokenUsage) -> float:
        """USD for `usage`: uncached prompt tokens are written to the cache."""
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        uncached = usage.prompt_tokens - cached
        return (
            uncached * self.cache_write
            + cached * self.cached_input
            + usage.completion_tokens * self.output
        ) / 1e6


def _openai(input: float, cached: float, output: float, note: str = "") -> ModelPrice:
    return ModelPrice(input=input, cached_input=cached, cache_write=input, output=output, note=note)


MODEL_PRICES: dict[str, ModelPrice] = {
    "gpt-6.1-terra": _openai(1.00, 0.05, 5.00, "default; gpt-5-mini's named replacement"),
    "gpt-6-luna": _openai(0.10, 0.01, 0.50, "low-cost line; reasons by default"),
    "gpt-5-mini": _openai(0.25, 0.025, 2.00, "shut down 2026-12-11"),
    "gpt-5-nano": _openai(0.05, 0.005, 0.40, "shut down 2026-12-11"),
    "gpt-5": _openai(1.25, 0.125, 10.00, "shut down 2026-12-11"),
    "gpt-4.1-mini": _openai(0.40, 0.10, 1.60),
    "gpt-4o-mini": _openai(0.15, 0.075, 0.60),
}

# A facts answer is short JSON; reasoning at low effort adds hidden tokens on top.
EST_COMPLETION_TOKENS = 600


def price_of(model: str | None) -> ModelPrice | None:
    """The model's price; dated snapshots (`gpt-6.1-terra-2026-11-20`) take their family's."""
    if not model:
        return None
    if model in MODEL_PRICES:
        return MODEL_PRICES[model]
    best = max(
        (name for name in MODEL_PRICES if model.startswith(name + "-")), key=len, default=None
    )
    return MODEL_PRICES[best] if best is not None else None


def cost_usd(model: str | None, usage: TokenUsage) -> float | None:
    price = price_of(model)
    return None if price is None else price.cost(usage)
