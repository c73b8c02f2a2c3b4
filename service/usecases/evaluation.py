"""`crm-backend eval`: how well does an analyzer/model read *these* leads? Writes nothing.

Ground truth comes from labeled dialogs (the format of `shared/dialogs/dialogs.json`) or
from the leads whose stage, niche, owner or budget a salesperson set by hand
(`manual_fields`), re-analysed on their current dialogs. The cost is estimated before any
call and the run stops when it exceeds the cap.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

import msgspec

from service.adapters.analyzers.base import Analyzer, TokenUsage
from service.adapters.analyzers.prices import EST_COMPLETION_TOKENS, PRICES_AS_OF, price_of
from service.domain.dialog import Contact, Dialog, DialogMessage, dialog_of, jid_of
from service.domain.facts import FUNNEL_STAGES
from service.domain.lead import LeadRow
from service.domain.scoring import budget_stated, score

# Fields compared, in print order; `interest` is derived from the facts by the score.
FIELDS = ("funnel_stage", "niche", "is_owner", "budget_stated", "interest")
# Label keys of the labeled-dialogs file, and the field each one settles.
LABEL_TRUTH = {
    "funnel_stage": "funnel_stage",
    "niche": "niche",
    "is_owner": "is_owner",
    "budget_stated": "budget_stated",
    "expected_interest": "interest",
}
# Manual edits that count as truth, and the field each one settles.
MANUAL_TRUTH = {
    "funnel_stage": "funnel_stage",
    "niche": "niche",
    "is_owner": "is_owner",
    "ad_budget": "budget_stated",
    "interest_level": "interest",
}


class EvalCase(msgspec.Struct, kw_only=True):
    id: str
    dialog: Dialog
    truth: dict[str, Any]  # field → true value (only the fields known)


class FieldAgreement(msgspec.Struct, kw_only=True):
    agree: int = 0
    total: int = 0

    @property
    def share(self) -> float | None:
        return self.agree / self.total if self.total else None


class CostEstimate(msgspec.Struct, kw_only=True):
    dialogs: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None  # None: no price for the model in the table
    prices_as_of: str = PRICES_AS_OF


class EvalReport(msgspec.Struct, kw_only=True):
    analyzer: str
    model: str | None
    dialogs: int
    agreement: dict[str, dict[str, Any]]  # field → {agree, total, share}
    stage_confusion: dict[str, dict[str, int]]  # true stage → predicted stage → count
    analyzers_used: dict[str, int]  # openai / rules-fallback / rules → count
    tokens: dict[str, int]
    cost_usd: float | None
    estimated: CostEstimate
    latency_seconds: dict[str, float]  # p50, p95, max, mean
    errors: int = 0
    prices_as_of: str = PRICES_AS_OF


class CostCapExceeded(Exception):
    def __init__(self, estimate: CostEstimate, cap: float) -> None:
        super().__init__(
            f"estimated cost ${estimate.cost_usd:.4f} for {estimate.dialogs} dialogs is over "
            f"--max-cost ${cap:.2f}: raise --max-cost or pass --max-dialogs"
        )
        self.estimate = estimate


# -- ground truth ------------------------------------------------------------------------


def cases_from_labels(items: Sequence[dict[str, Any]], instance: str = "labels") -> list[EvalCase]:
    """Labeled dialogs: `{id, contact: {phone, push_name}, messages: [{from_me, text, ts}],
    labels: {niche, is_owner, budget_stated, funnel_stage, expected_interest}}`."""
    cases = []
    for item in items:
        labels = item["labels"]
        truth = {field: labels[key] for key, field in LABEL_TRUTH.items() if key in labels}
        phone = str(item["contact"]["phone"])
        messages = [
            DialogMessage(
                id=f"{item['id']}-{i}",
                from_me=bool(m["from_me"]),
                timestamp=datetime.fromisoformat(str(m["ts"]).replace("Z", "+00:00")),
                text=str(m["text"]),
                type="conversation",
            )
            for i, m in enumerate(item["messages"])
        ]
        contact = Contact(
            phone=phone, remote_jid=jid_of(phone), name=item["contact"].get("push_name")
        )
        dialog = dialog_of(instance, contact, messages)
        cases.append(EvalCase(id=str(item["id"]), dialog=dialog, truth=truth))
    return cases


def truth_from_edits(row: LeadRow) -> dict[str, Any]:
    """The fields a person set on this lead, as truth."""
    truth: dict[str, Any] = {}
    for column, field in MANUAL_TRUTH.items():
        if column not in row.manual_fields:
            continue
        if field == "budget_stated":
            truth[field] = budget_stated(row.ad_budget)
        elif field == "interest":
            truth[field] = row.interest_level
        else:
            truth[field] = getattr(row, column)
    return truth


def has_truth(row: LeadRow) -> bool:
    return any(column in row.manual_fields for column in MANUAL_TRUTH)


# -- cost ---------------------------------------------------------------------------------


def estimate_cost(
    cases: Sequence[EvalCase], estimate_tokens: Callable[[Dialog], int], model: str | None
) -> CostEstimate:
    """Upper-side estimate: every dialog once, no cache, the usual answer length."""
    prompt = sum(estimate_tokens(case.dialog) for case in cases)
    completion = EST_COMPLETION_TOKENS * len(cases)
    price = price_of(model)
    cost = None
    if price is not None:
        cost = price.cost(TokenUsage(prompt_tokens=prompt, completion_tokens=completion))
    return CostEstimate(
        dialogs=len(cases), prompt_tokens=prompt, completion_tokens=completion, cost_usd=cost
    )


# -- the run ------------------------------------------------------------------------------


async def evaluate(
    cases: Sequence[EvalCase],
    analyzer: Analyzer,
    *,
    model: str | None,
    estimate: CostEstimate,
    concurrency: int = 4,
) -> EvalReport:
    """Analyse every case (nothing is stored) and compare with the truth."""
    gate = asyncio.Semaphore(max(1, concurrency))
    predictions: list[dict[str, Any] | None] = [None] * len(cases)
    latencies: list[float] = []
    usage = TokenUsage()
    used: dict[str, int] = {}
    errors = 0

    async def one(index: int, case: EvalCase) -> None:
        nonlocal errors
        async with gate:
            started = time.perf_counter()
            try:
                result = await analyzer.analyze(case.dialog)
            except Exception as exc:
                errors += 1
                spent = getattr(exc, "usage", None)
                if isinstance(spent, TokenUsage):
                    _add(usage, spent)
                return
            finally:
                latencies.append(time.perf_counter() - started)
        if result.usage is not None:
            _add(usage, result.usage)
        used[result.analyzer] = used.get(result.analyzer, 0) + 1
        facts = result.facts
        predictions[index] = {
            "funnel_stage": facts.funnel_stage,
            "niche": facts.niche,
            "is_owner": facts.is_owner,
            "budget_stated": budget_stated(facts.ad_budget),
            "interest": score(facts).interest_level,
        }

    await asyncio.gather(*(one(i, case) for i, case in enumerate(cases)))

    agreement = {field: FieldAgreement() for field in FIELDS}
    confusion: dict[str, dict[str, int]] = {}
    for case, predicted in zip(cases, predictions, strict=True):
        if predicted is None:
            continue
        for field, true_value in case.truth.items():
            tally = agreement[field]
            tally.total += 1
            tally.agree += predicted[field] == true_value
        if "funnel_stage" in case.truth:
            row = confusion.setdefault(case.truth["funnel_stage"], {})
            guess = predicted["funnel_stage"]
            row[guess] = row.get(guess, 0) + 1

    price = price_of(model)
    return EvalReport(
        analyzer=analyzer.name,
        model=model,
        dialogs=len(cases),
        agreement={
            f: {"agree": a.agree, "total": a.total, "share": a.share} for f, a in agreement.items()
        },
        stage_confusion=confusion,
        analyzers_used=used,
        tokens=msgspec.to_builtins(usage),
        cost_usd=None if price is None else round(price.cost(usage), 6),
        estimated=estimate,
        latency_seconds=_latency(latencies),
        errors=errors,
    )


# Column heads of the confusion table, in FUNNEL_STAGES order.
_STAGE_SHORT = ("new", "not_q", "qual", "booked", "done", "closed", "lost")


def _add(total: TokenUsage, part: TokenUsage) -> None:
    total.prompt_tokens += part.prompt_tokens
    total.cached_tokens += part.cached_tokens
    total.completion_tokens += part.completion_tokens
    total.calls += part.calls
    total.calls_without_usage += part.calls_without_usage


def _latency(values: Iterable[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {
        "p50": round(statistics.median(ordered), 3),
        "p95": round(p95, 3),
        "max": round(ordered[-1], 3),
        "mean": round(statistics.fmean(ordered), 3),
    }


# -- text report --------------------------------------------------------------------------


def render(report: EvalReport) -> str:
    lines = [
        f"eval: {report.dialogs} dialogs, analyzer {report.analyzer}"
        + (f", model {report.model}" if report.model else ""),
        "",
        "agreement with the truth:",
    ]
    for field in FIELDS:
        tally = report.agreement[field]
        share = tally["share"]
        shown = f"{share:6.1%}" if share is not None else "     —"
        lines.append(f"  {field:<14} {shown}  ({tally['agree']}/{tally['total']})")
    stages = [s for s in FUNNEL_STAGES if s in report.stage_confusion] or []
    predicted = sorted(
        {p for row in report.stage_confusion.values() for p in row},
        key=lambda s: FUNNEL_STAGES.index(s) if s in FUNNEL_STAGES else 99,
    )
    if stages:
        short = dict(zip(FUNNEL_STAGES, _STAGE_SHORT, strict=True))
        width = max(len(short[s]) for s in predicted) + 2
        lines += ["", "stage confusion (rows: truth, columns: analyzer):"]
        lines.append(" " * 10 + "".join(f"{short[p]:>{width}}" for p in predicted))
        for stage in stages:
            row = report.stage_confusion[stage]
            lines.append(
                f"  {short[stage]:<8}" + "".join(f"{row.get(p, 0):>{width}}" for p in predicted)
            )
    used = ", ".join(f"{k} {v}" for k, v in sorted(report.analyzers_used.items()))
    tokens = report.tokens
    if report.model is None:
        cost = "$0 (no model calls)"
    elif report.cost_usd is None:
        cost = f"unknown: no price for {report.model} in the table (a local server costs none)"
    else:
        cost = f"${report.cost_usd:.4f}"
    est = report.estimated
    est_cost = f"${est.cost_usd:.4f}" if est.cost_usd is not None else "—"
    latency = report.latency_seconds
    lines += [
        "",
        f"answers: {used or 'none'}; errors {report.errors}",
        f"tokens: prompt {tokens['prompt_tokens']} (cached {tokens['cached_tokens']}), "
        f"completion {tokens['completion_tokens']}, calls {tokens['calls']}",
        f"cost: {cost}"
        + (
            f"; estimated before the run: {est_cost} (prices of {report.prices_as_of})"
            if report.model
            else ""
        ),
    ]
    if latency:
        lines.append(
            f"latency per dialog: p50 {latency['p50']:.2f} s, p95 {latency['p95']:.2f} s, "
            f"max {latency['max']:.2f} s"
        )
    return "\n".join(lines)
