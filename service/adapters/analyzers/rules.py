"""Rules analyzer: lead facts from a dialog with keyword and pattern rules, no model.

Reads both sides of the dialog (the manager's messages confirm bookings and payments).
Pure CPU and deterministic: the same dialog always gives the same facts. Patterns live in
`rules_lexicon`; this module weighs them:

- niche and business type from the client's words (the manager's recaps as a fallback);
- owner from first-person claims, answers to "вы владелец?" and non-owner roles;
- budget from money amounts said in a budget context;
- funnel stage from events on both sides (booked, completed, paid, lost), later events
  overriding earlier ones, then fit and qualification.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
from collections.abc import Mapping, Sequence
from functools import cached_property
from itertools import pairwise
from types import MappingProxyType
from typing import Literal

import msgspec

from service.adapters.analyzers import rules_lexicon as lx
from service.adapters.analyzers.base import AnalysisResult, AnalyzerUnavailableError
from service.domain.dialog import Dialog, DialogMessage
from service.domain.evidence import Citations, Evidence, FactEvidence, cite, fact_evidence
from service.domain.facts import Action, FunnelStage, LeadFacts, MainIntent, Niche

Lang = Literal["ru", "en"]
EventKind = Literal["booked", "completed", "closed", "lost"]

# One-to-one character replacements, so spans found in normalised text index the original.
_CHAR_MAP = str.maketrans(
    {
        "ё": "е",
        "Ё": "Е",
        "–": "-",
        "—": "-",
        "−": "-",
        "\u00a0": " ",
        "\u2009": " ",
        "\u202f": " ",
        "\u200b": " ",
        "\u200c": " ",
        "\u200d": " ",
        "\ufeff": " ",
        "’": "'",
        "‘": "'",
    }
)
_STAGE_RANK: Mapping[str, int] = MappingProxyType({"booked": 1, "completed": 2, "closed": 3})
_EVENT_STAGE: Mapping[str, FunnelStage] = MappingProxyType(
    {
        "booked": "consultation_booked",
        "completed": "consultation_completed",
        "closed": "deal_closed",
        "lost": "deal_lost",
    }
)


def _hit(pattern: lx.Matcher, text: str) -> bool:
    return pattern.search(text) is not None


class _Msg:
    """One cleaned message. Its cues are matched lazily: each pattern at most once per
    message and only when a rule asks, which keeps long dialogs cheap."""

    def __init__(
        self,
        index: int,
        from_me: bool,
        raw: str,
        text: str,
        *,
        source: DialogMessage,
        shift: int | None,
    ) -> None:
        self.index = index
        self.from_me = from_me
        self.raw = raw  # cleaned text, case kept (for quoting the client's own words)
        self.text = text  # normalised: lower case, `ё` → `е`
        self.source = source  # the message as analysed (its id and text cite it)
        # source.text[i + shift] is text[i] (None: cleaning moved characters around).
        self.shift = shift

    def cite(self, *patterns: lx.Matcher) -> Evidence | None:
        """Evidence quoting this message where the first of `patterns` matches (from its
        start when none does)."""
        for pattern in patterns:
            found = pattern.search(self.text)
            if found is not None:
                return self.cite_span(found.start(), found.end())
        return cite(self.source)

    def cite_span(self, start: int, end: int) -> Evidence | None:
        """Evidence quoting around text[start:end], placed in the original text."""
        if self.shift is not None:
            return cite(self.source, start + self.shift, end + self.shift)
        needle = self.text[start:end]
        folded = normalise(self.source.text)
        at = folded.find(needle) if needle and len(folded) == len(self.source.text) else -1
        return cite(self.source, at, at + len(needle)) if at >= 0 else cite(self.source)

    def has(self, pattern: lx.Matcher) -> bool:
        return pattern.search(self.text) is not None

    @cached_property
    def time(self) -> bool:  # a concrete day or clock time
        return self.has(lx.TIME_DIGITS) or self.has(lx.TIME_WORDS)

    @cached_property
    def meeting(self) -> bool:
        return self.has(lx.MEETING_STRICT)

    @cached_property
    def confirm(self) -> bool:
        return self.has(lx.BOOKING_CONFIRM) and not self.text.rstrip().endswith("?")

    @cached_property
    def completed(self) -> bool:
        return self.has(lx.COMPLETED)

    @cached_property
    def lost(self) -> bool:
        if self.from_me:
            return self.has(lx.LOST_MANAGER)
        return self.has(lx.LOST_CLIENT) and not self.has(lx.RESCHEDULE)

    @cached_property
    def paid(self) -> bool:
        if self.from_me:
            return self.has(lx.PAID_MANAGER)
        # A contract signed with a competitor is no deal of ours.
        return not self.lost and self.has(lx.PAID_CLIENT)

    @cached_property
    def owner_question_you(self) -> bool:
        return self.has(lx.OWNER_QUESTION_2P)

    @cached_property
    def owner_question_other(self) -> bool:
        return self.has(lx.OWNER_QUESTION_3P)

    @cached_property
    def budget_question(self) -> bool:
        return self.has(lx.BUDGET_QUESTION)

    def quote(self, limit: int = 70) -> str:
        text = " ".join(self.raw.split())
        return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


class _Money(msgspec.Struct, frozen=True):
    phrase: str  # the client's own words, e.g. "где-то 400 тыс тг"
    usd: float  # rough value, only to spot a budget far too small
    start: int = 0  # where the amount is in the text it was found in
    end: int = 0
    proof: Citations = ()


class _Niche(msgspec.Struct, frozen=True):
    niche: Niche
    business_type: str | None
    business_known: bool
    job_seeker: bool
    not_business: bool
    evidence: str | None  # the message that made the contact a targetologist / job seeker
    proof: Citations = ()  # the messages that tell the niche


class _Event(msgspec.Struct, frozen=True):
    kind: EventKind
    quote: str
    at: int  # index of the message


class _Stage(msgspec.Struct, frozen=True):
    stage: FunnelStage
    why: str
    quote: str | None
    proof: Citations = ()


# -- preparation ------------------------------------------------------------------------------


def normalise(text: str) -> str:
    return text.translate(_CHAR_MAP).lower()


def _strip_injections(text: str) -> str:
    """Drop segments that speak to the analyzer rather than to the manager."""
    if not _hit(lx.INJECTION, text.lower()):
        return text
    kept = [
        seg.strip()
        for seg in lx.SEGMENT_SPLIT.split(text)
        if seg and seg.strip() and not _hit(lx.INJECTION, seg.lower())
    ]
    return " ".join(kept)


def prepare(messages: Sequence[DialogMessage]) -> list[_Msg]:
    out: list[_Msg] = []
    for message in messages:
        mapped = message.text.translate(_CHAR_MAP)
        cleaned = _strip_injections(mapped)
        raw = cleaned.strip()
        if not raw:
            continue
        text = raw.lower()
        # Spans index the original text where cleaning only cut leading blanks.
        shift: int | None = len(mapped) - len(mapped.lstrip())
        if cleaned is not mapped:
            shift = None
        if len(text) != len(raw):  # a rare case-folding that changes length: spans must agree
            raw = text
            shift = None
        out.append(_Msg(len(out), message.from_me, raw, text, source=message, shift=shift))
    return out


def _language(msgs: Sequence[_Msg]) -> Lang:
    pool = [m.text for m in msgs if not m.from_me] or [m.text for m in msgs]
    sample = " ".join(pool)[:600]
    cyrillic = len(lx.CYRILLIC.findall(sample))
    latin = len(lx.LATIN.findall(sample))
    return "en" if latin > cyrillic else "ru"


def _last_manager_before(msgs: Sequence[_Msg], index: int) -> _Msg | None:
    for j in range(index - 1, -1, -1):
        if msgs[j].from_me:
            return msgs[j]
    return None


# -- niche ----------------------------------------------------------------------------------


def _score_terms(
    text: str, terms: Sequence[tuple[lx.Matcher, int, str, str]], lang: Lang
) -> tuple[int, str | None, lx.Matcher | None]:
    """Sum of the weights of the terms found, and the label and pattern of the heaviest."""
    total = 0
    label: str | None = None
    heaviest: lx.Matcher | None = None
    best = 0
    for pattern, weight, ru, en in terms:
        if _hit(pattern, text):
            total += weight
            if weight > best:
                best, label, heaviest = weight, ru if lang == "ru" else en, pattern
    return total, label, heaviest


def _first_citing(msgs: Sequence[_Msg], pattern: lx.Matcher | None) -> Citations:
    """The first of `msgs` where `pattern` matches, cited there."""
    if pattern is None:
        return ()
    found = next((m for m in msgs if m.has(pattern)), None)
    cited = found.cite(pattern) if found is not None else None
    return () if cited is None else (cited,)


def _cited(*items: Evidence | None) -> Citations:
    return tuple(item for item in items if item is not None)


def _targetologist_evidence(client: Sequence[_Msg], said: str, owner_claim: bool) -> _Msg | None:
    if _hit(lx.IN_HOUSE, said) and not _hit(lx.FREELANCE, said):
        return None
    if _hit(lx.TARGETOLOGIST_SELF, said):
        found = next((m for m in client if m.has(lx.TARGETOLOGIST_SELF)), None)
        if found is not None:
            return found
    if not _hit(lx.MARKETING_WORDS, said):
        return None
    seeks = _hit(lx.JOB_SEEKER, said)
    offers = not owner_claim and _hit(lx.TARGETOLOGIST_OFFER, said)
    if not (seeks or offers):
        return None
    for m in client:
        if (seeks and m.has(lx.JOB_SEEKER)) or (offers and m.has(lx.TARGETOLOGIST_OFFER)):
            return m
    return None


def _manager_recaps(msgs: Sequence[_Msg]) -> str:
    """Manager sentences describing the contact ("Напомню: клиника ..."): not questions, not
    the agency talking about itself ("кейсы клиник", "мы работаем")."""
    found: list[str] = []
    for m in msgs:
        if not m.from_me:
            continue
        for sentence in lx.SENTENCE.split(m.text):
            if sentence.rstrip().endswith("?") or _hit(lx.AGENCY_TALK, sentence):
                continue
            found.append(sentence)
    return " \n ".join(found)


def _niche(msgs: Sequence[_Msg], said: str, lang: Lang) -> _Niche:
    client = [m for m in msgs if not m.from_me]
    joined = said
    job_seeker = (
        next((m for m in client if m.has(lx.JOB_SEEKER)), None)
        if _hit(lx.JOB_SEEKER, said)
        else None
    )
    not_business = _hit(lx.NOT_BUSINESS, joined)
    owner_claim = _hit(lx.OWNER_NOUN, joined)
    target = _targetologist_evidence(client, said, owner_claim) if client else None
    if target is not None:
        return _Niche(
            niche="targetologist",
            business_type="таргетолог / SMM" if lang == "ru" else "targetologist / SMM",
            business_known=True,
            job_seeker=job_seeker is not None,
            not_business=not_business,
            evidence=target.quote(),
            proof=_cited(target.cite(lx.TARGETOLOGIST_SELF, lx.JOB_SEEKER, lx.TARGETOLOGIST_OFFER)),
        )
    cited_in = client
    med, med_label, med_term = _score_terms(joined, lx.MEDICINE_TERMS, lang)
    info, info_label, info_term = _score_terms(joined, lx.INFO_TERMS, lang)
    if med == 0 and info == 0:
        recaps = _manager_recaps(msgs)
        med, med_label, med_term = _score_terms(recaps, lx.MEDICINE_TERMS, lang)
        info, info_label, info_term = _score_terms(recaps, lx.INFO_TERMS, lang)
        cited_in = [m for m in msgs if m.from_me]
    other = next(
        (((ru if lang == "ru" else en), p) for p, ru, en in lx.OTHER_BUSINESS if _hit(p, joined)),
        None,
    )
    other_label = other[0] if other else None
    niche: Niche = "other"
    business_type = other_label
    proof: Citations = ()
    # An online programme beats medical words (a nutritionist selling a course is
    # infobusiness); medicine needs more than a lone "doctor" or "patients".
    if info >= 3 and info > med:
        niche, business_type = "infobusiness", info_label
        proof = _first_citing(cited_in, info_term)
    elif med >= 2:
        niche, business_type = "medicine", med_label
        proof = _first_citing(cited_in, med_term)
    elif info >= 2:
        niche, business_type = "infobusiness", info_label
        proof = _first_citing(cited_in, info_term)
    elif other is not None:
        proof = _first_citing(client, other[1])
    seeker = job_seeker is not None and niche == "other" and not owner_claim
    if seeker and job_seeker is not None:
        proof = _cited(job_seeker.cite(lx.JOB_SEEKER))
    return _Niche(
        niche=niche,
        business_type=None if seeker else business_type,
        business_known=niche != "other" or (other_label is not None and not seeker),
        job_seeker=seeker,
        not_business=not_business and niche == "other",
        evidence=job_seeker.quote() if seeker and job_seeker is not None else None,
        proof=proof,
    )


# -- owner ----------------------------------------------------------------------------------

_BUSINESS_TERMS: tuple[lx.Matcher, ...] = (
    *(t[0] for t in lx.MEDICINE_TERMS),
    *(t[0] for t in lx.INFO_TERMS),
    *(t[0] for t in lx.OTHER_BUSINESS),
)


def _says_my_business(text: str) -> bool:
    """ "У меня стоматология", "барбершоп у меня": the speaker has the business."""
    for sentence in lx.SENTENCE.split(text):
        if (
            _hit(lx.HAS_MY, sentence)
            and not _hit(lx.MY_EXCLUDED, sentence)
            and any(_hit(p, sentence) for p in _BUSINESS_TERMS)
        ):
            return True
    return False


def _owner(msgs: Sequence[_Msg], targetologist: bool) -> tuple[bool | None, Citations]:
    """Explicit "не моя"/"наёмный" > an owner noun said of oneself > a non-owner role >
    weaker claims ("у меня ...", "мой", "да" to "вы владелец?"). Also the messages that
    decided it (the first of the deciding kind)."""
    strong = weak = negative = explicit_negative = False
    # The first messages of each kind (evidence only: the flags alone decide).
    proof: dict[str, Citations] = {}
    for m in msgs:
        if m.from_me:
            continue
        text = m.text
        if m.has(lx.OWNER_NEGATION):
            explicit_negative = True
            proof.setdefault("explicit", _cited(m.cite(lx.OWNER_NEGATION)))
        # "она владелица", "собственник поручил" are about somebody else.
        # "мой руководитель" claims nothing.
        own_words = lx.NOT_OWNER_FOLLOWERS.sub(" ", text)
        if m.has(lx.OWNER_THIRD_PERSON):
            own_words = lx.OWNER_THIRD_PERSON.sub(" ", own_words)
        noun = lx.OWNER_NOUN.search(own_words) if m.has(lx.OWNER_NOUN) else None
        if noun and not _hit(lx.ENDS_WITH_NOT, own_words[: noun.start()]):
            strong = True
            proof.setdefault("strong", _cited(m.cite(lx.OWNER_NOUN)))
        if m.has(lx.OWNER_CLAIM) and _hit(lx.OWNER_CLAIM, own_words):
            weak = True
            proof.setdefault("weak", _cited(m.cite(lx.OWNER_CLAIM)))
        if m.has(lx.HAS_MY) and _says_my_business(own_words):
            weak = True
            proof.setdefault("weak", _cited(m.cite(lx.HAS_MY)))
        if m.has(lx.NON_OWNER_ROLE):
            negative = True
            proof.setdefault("negative", _cited(m.cite(lx.NON_OWNER_ROLE)))
        question = _last_manager_before(msgs, m.index)
        if question is None or question.index < m.index - 2:
            continue
        if _hit(lx.AFFIRMATIVE, text):
            # "Вы владелец?" - "Да" is a claim; "Решает руководитель?" - "Да" is not.
            if question.owner_question_you:
                weak = True
                proof.setdefault(
                    "weak", _cited(question.cite(lx.OWNER_QUESTION_2P), m.cite(lx.AFFIRMATIVE))
                )
            elif question.owner_question_other:
                negative = True
                proof.setdefault(
                    "negative",
                    _cited(question.cite(lx.OWNER_QUESTION_3P), m.cite(lx.AFFIRMATIVE)),
                )
        elif question.owner_question_you and _hit(lx.NEGATIVE_START, text):
            negative = True
            proof.setdefault(
                "negative", _cited(question.cite(lx.OWNER_QUESTION_2P), m.cite(lx.NEGATIVE_START))
            )
    if explicit_negative:
        return False, proof["explicit"]
    if strong:
        return True, proof["strong"]
    if negative or targetologist:
        return False, proof.get("negative", ())
    return (True, proof["weak"]) if weak else (None, ())


# -- budget ---------------------------------------------------------------------------------


def _to_number(token: str) -> float | None:
    token = token.strip()
    if re.fullmatch(r"\d{1,3}([ ,.]\d{3})+", token):  # 10,000 / 500 000: thousands separators
        return float(re.sub(r"[ ,.]", "", token))
    try:
        return float(token.replace(" ", "").replace(",", "."))
    except ValueError:
        return None


def _upper_bound(range_text: str) -> float | None:
    return _to_number(re.split(r"\s*(?:-|до|to)\s*", range_text)[-1])


def _table_value(table: Sequence[tuple[str, float]], word: str | None) -> float | None:
    if word:
        for prefix, value in table:
            if word.startswith(prefix):
                return value
    return None


_CONTEXT_CHARS = 48  # words around an amount that say it is no budget ("по", "подписчиков")


def _money_in(text: str, raw: str, budget_question: bool, lang: Lang) -> list[_Money]:
    """Money amounts in one message; a bare number only as the whole answer to a budget
    question ("Сколько готовы вкладывать?" - "200")."""
    found: list[_Money] = []
    short = len(text.split()) <= 5
    default_rate = lx.UNKNOWN_CURRENCY_USD[lang]
    for match in lx.MONEY.finditer(text):
        groups = match.groupdict()
        number = groups["pnum"] or groups["rnum"] or groups["cnum"] or groups["num"]
        mult = groups["pmult"] or groups["rmult"] or groups["cmult"] or groups["mult"]
        cur = groups["pcur"] or groups["rcur"] or groups["rcur2"] or groups["cur"]
        start = match.start() + len(groups["approx"] or "")
        if number is None or (start > 0 and (text[start - 1].isalnum() or text[start - 1] in ".,")):
            continue
        # Bounded windows around the amount: slicing the rest of the text per match made
        # a message repeating amounts quadratic.
        after = text[match.end() : match.end() + _CONTEXT_CHARS]
        before = text[max(0, match.start() - _CONTEXT_CHARS) : match.start()]
        if _hit(lx.NOT_MONEY_AFTER, after) or _hit(lx.PER_UNIT_BEFORE, before):
            continue
        value = _upper_bound(number)
        if value is None:
            continue
        if not mult and not cur:
            if not (budget_question and short and value >= 10):
                continue
            value = value * 1000 if value < 1000 else value
        value *= _table_value(lx.MULTIPLIERS, mult) or 1.0
        rate = _table_value(lx.CURRENCY_USD, cur) or _table_value(lx.CURRENCY_USD, mult)
        found.append(_money_at(raw, match, value * (rate or default_rate)))
    for match in lx.WORD_MONEY.finditer(text):
        words = match.group("words").split()
        first = words[1] if words[0] in ("тысяч", "тыщ") else words[0]  # "тысяч сорок"
        value = 500e3 if first.startswith("пол") else lx.WORD_VALUES.get(first, 0.0)
        rate = _table_value(lx.CURRENCY_USD, match.group("cur"))
        found.append(_money_at(raw, match, value * (rate or default_rate)))
    return found


def _money_at(raw: str, match: re.Match[str], usd: float) -> _Money:
    """The amount `match` found, quoted from the original text."""
    phrase = raw[match.start() : match.end()].strip(" ,.;")
    return _Money(phrase=phrase, usd=usd, start=match.start(), end=match.end())


def _budget(msgs: Sequence[_Msg], lang: Lang) -> _Money | None:
    """The first amount the client states as an ad budget (not a price, revenue or CPL)."""
    for m in msgs:
        if m.from_me or not m.has(lx.MONEY_HINT) or m.has(lx.BUDGET_REFUSAL):
            continue
        question = _last_manager_before(msgs, m.index)
        asked = question is not None and question.budget_question
        if not (asked or m.has(lx.BUDGET_WORDS)):
            continue
        if m.has(lx.NOT_BUDGET_CONTEXT) and not m.has(lx.BUDGET_WORD):
            continue
        money = _money_in(m.text, m.raw, asked, lang)
        if money:
            first = money[0]
            cited = m.cite_span(first.start, first.end)
            if asked and question is not None and not m.has(lx.BUDGET_WORDS):
                # A bare answer ("200") means little without the question it answers.
                cited_question = question.cite(lx.BUDGET_QUESTION)
                return msgspec.structs.replace(first, proof=_cited(cited_question, cited))
            return msgspec.structs.replace(first, proof=_cited(cited))
    return _recapped_budget(msgs, lang)


def _recapped_budget(msgs: Sequence[_Msg], lang: Lang) -> _Money | None:
    """A budget the manager repeated back ("напомню: ... бюджет 700 тыс") and the client
    confirmed ("да, всё верно")."""
    for m, reply in pairwise(msgs):
        if not m.from_me or reply.from_me or not _hit(lx.RECAP_MARKERS, m.text):
            continue
        if not _hit(lx.RECAP_CONFIRM, reply.text):
            continue
        for word in lx.BUDGET_WORD.finditer(m.text):
            tail_text, tail_raw = m.text[word.end() :], m.raw[word.end() :]
            money = _money_in(tail_text[:40], tail_raw[:40], False, lang)
            if money and tail_text.find(money[0].phrase.lower()) <= 12:
                first = money[0]
                said = m.cite_span(word.end() + first.start, word.end() + first.end)
                confirmed = reply.cite(lx.RECAP_CONFIRM)
                return msgspec.structs.replace(first, proof=_cited(said, confirmed))
    return None


# -- funnel stage ---------------------------------------------------------------------------


def _is_booking(msgs: Sequence[_Msg], i: int) -> bool:
    """A concrete slot agreed at message i (cheap, selective checks first)."""
    m = msgs[i]
    if m.from_me and m.has(lx.BOOKING_REMINDER):
        return True

    def meeting_near() -> bool:
        return any(msgs[j].meeting for j in range(max(0, i - 4), i + 1))

    if m.confirm and any(msgs[j].time for j in range(max(0, i - 2), i + 1)) and meeting_near():
        return True
    previous = msgs[i - 1] if i > 0 else None
    if m.from_me:
        # The manager accepts the slot the client proposed ("Давайте в пятницу в 11?" - "Да, ...").
        return (
            previous is not None
            and not previous.from_me
            and previous.time
            and previous.meeting
            and _hit(lx.AGREE, m.text)
            and m.time
        )
    after_slot = previous is not None and previous.from_me and previous.time
    if not (m.time or after_slot):  # every rule below needs a time here or just before
        return False
    if m.has(lx.DECLINE_TIME) and not m.has(lx.PROPOSAL):
        return False
    if (
        previous is not None
        and previous.from_me
        and _hit(lx.AGREE, m.text)
        and previous.time
        and meeting_near()
    ):
        return True
    # The client names a time in answer to a meeting proposal or to "когда удобно?".
    question = _last_manager_before(msgs, i)
    return (
        question is not None
        and question.index >= i - 2
        and m.time
        and (question.meeting or question.has(lx.ASK_WHEN))
        and not m.has(lx.LATER_ACTION)
    )


def _events(msgs: Sequence[_Msg]) -> list[_Event]:
    events: list[_Event] = []
    for i, m in enumerate(msgs):
        kinds: list[EventKind] = []
        if _is_booking(msgs, i):
            kinds.append("booked")
        if m.completed:
            kinds.append("completed")
        if m.paid:
            kinds.append("closed")
        if m.lost:  # last: within one message a refusal wins
            kinds.append("lost")
        events.extend(_Event(kind=kind, quote=m.quote(), at=i) for kind in kinds)
    return events


# Where in its message each event is said (the quote is cut around it).
_EVENT_CUES: Mapping[str, tuple[lx.Matcher, ...]] = MappingProxyType(
    {
        "booked": (lx.BOOKING_REMINDER, lx.TIME_DIGITS, lx.TIME_WORDS, lx.BOOKING_CONFIRM),
        "completed": (lx.COMPLETED,),
        "closed": (lx.PAID_MANAGER, lx.PAID_CLIENT),
        "lost": (lx.LOST_MANAGER, lx.LOST_CLIENT),
    }
)


def _event_proof(msgs: Sequence[_Msg], event: _Event) -> Citations:
    return _cited(msgs[event.at].cite(*_EVENT_CUES[event.kind]))


def _walk(events: Sequence[_Event]) -> _Event | None:
    """Later events override earlier ones; progress never moves back except to lost.
    The first event of the furthest stage is kept (its quote is the clearest evidence)."""
    state: _Event | None = None
    for event in events:
        if event.kind == "lost" or state is None or state.kind == "lost":
            state = event
        elif _STAGE_RANK[event.kind] > _STAGE_RANK[state.kind]:
            state = event
    return state


def _answers_price(msgs: Sequence[_Msg], i: int) -> bool:
    """ "Дорого" about the agency's price or offer (not about past ads)."""
    if msgs[i].has(lx.PRICE_SUBJECT):
        return True
    offer = _last_manager_before(msgs, i)
    return offer is not None and offer.index >= i - 2 and offer.has(lx.PRICE_TALK)


def _not_a_fit(msgs: Sequence[_Msg], niche: _Niche, budget: _Money | None) -> _Stage | None:
    """not_qualified for who the contact is (not for refusing to answer)."""
    if niche.niche == "targetologist":
        return _Stage(
            stage="not_qualified", why="targetologist", quote=niche.evidence, proof=niche.proof
        )
    if niche.job_seeker:
        return _Stage(
            stage="not_qualified", why="job_seeker", quote=niche.evidence, proof=niche.proof
        )
    if niche.not_business:
        client = [m for m in msgs if not m.from_me]
        return _Stage(
            stage="not_qualified",
            why="not_business",
            quote=None,
            proof=_first_citing(client, lx.NOT_BUSINESS),
        )
    if budget is not None and budget.usd < lx.TOO_SMALL_USD:
        return _Stage(
            stage="not_qualified", why="too_small", quote=budget.phrase, proof=budget.proof
        )
    declined = next((m for m in msgs if m.from_me and m.has(lx.NOT_FIT_MANAGER)), None)
    if declined is not None:
        return _Stage(
            stage="not_qualified",
            why="manager_not_fit",
            quote=declined.quote(),
            proof=_cited(declined.cite(lx.NOT_FIT_MANAGER)),
        )
    return None


def _stage(
    msgs: Sequence[_Msg],
    niche: _Niche,
    is_owner: bool | None,
    budget: _Money | None,
    owner_proof: Citations = (),
) -> _Stage:
    """Events first (a booking or a deal outweighs who the contact is), then fit, an
    explicit refusal, silence after "дорого", and finally how much is qualified."""
    client = [m for m in msgs if not m.from_me]
    if not client:
        return _Stage(stage="new_lead", why="no_client", quote=None)
    last = _walk(_events(msgs))
    if last is not None and last.kind != "lost":
        return _Stage(
            stage=_EVENT_STAGE[last.kind],
            why=last.kind,
            quote=last.quote,
            proof=_event_proof(msgs, last),
        )
    unfit = _not_a_fit(msgs, niche, budget)
    if unfit is not None:
        return unfit
    if last is not None:
        return _Stage(
            stage="deal_lost", why="lost", quote=last.quote, proof=_event_proof(msgs, last)
        )
    refusal = next((m for m in client if m.has(lx.REFUSAL)), None)
    if refusal is not None and budget is None:
        return _Stage(
            stage="not_qualified",
            why="refused",
            quote=refusal.quote(),
            proof=_cited(refusal.cite(lx.REFUSAL)),
        )
    final = client[-1]
    if final.has(lx.PRICE_OBJECTION) and _answers_price(msgs, final.index):
        return _Stage(
            stage="deal_lost",
            why="silent_after_price",
            quote=final.quote(),
            proof=_cited(final.cite(lx.PRICE_OBJECTION)),
        )
    if niche.business_known and is_owner is not None and budget is not None:
        # Qualified by what is known: the niche, the role and the budget, where said.
        proof = (*niche.proof, *owner_proof, *budget.proof)
        return _Stage(stage="qualified", why="qualified", quote=None, proof=proof)
    return _Stage(stage="new_lead", why="new_lead", quote=None)


# -- secondary facts ------------------------------------------------------------------------


def _client_flag(
    msgs: Sequence[_Msg], said: str, yes: lx.Matcher, no: lx.Matcher, question: lx.Matcher
) -> bool | None:
    """The client's latest yes/no on a topic: said outright or answering the question."""
    says_no, says_yes = _hit(no, said), _hit(yes, said)
    answer: bool | None = None
    for i, m in enumerate(msgs):
        if m.from_me:
            continue
        if says_no and m.has(no):
            answer = False
        elif says_yes and m.has(yes):
            answer = True
        elif i > 0 and msgs[i - 1].from_me and msgs[i - 1].has(question):
            if _hit(lx.AFFIRMATIVE, m.text):
                answer = True
            elif _hit(lx.NEGATIVE_START, m.text) or _hit(lx.NOPE_START, m.text):
                answer = False
    return answer


def _instagram(msgs: Sequence[_Msg], said: str) -> str | None:
    if not (_hit(lx.INSTAGRAM_URL, said) or _hit(lx.INSTAGRAM_CONTEXT, said)):
        return None
    for m in msgs:
        if m.from_me:
            continue
        url = lx.INSTAGRAM_URL.search(m.text) if m.has(lx.INSTAGRAM_URL) else None
        if url:
            found = m.raw[url.start() : url.end()].rstrip("/")
            return found if found.startswith("http") else "https://" + found
        if m.has(lx.INSTAGRAM_CONTEXT):
            handle = lx.HANDLE.search(m.raw)
            if handle:
                return f"https://instagram.com/{handle.group(1).rstrip('.')}"
    return None


def _intent(said: str, niche: Niche) -> MainIntent:
    if _hit(lx.AI_WORDS, said) and _hit(lx.TARGET_TOPIC, said):
        return "ai_targetolog"
    if niche == "medicine":
        return "clinic_lead"
    if _hit(lx.AUDIT_WORDS, said):
        return "marketing_analysis"
    return "other"


def _objection(msgs: Sequence[_Msg], said: str, lang: Lang) -> str | None:
    """The client's latest objection; "дорого" only when it answers a price or an offer."""
    candidates = [entry for entry in lx.OBJECTIONS if _hit(entry[0], said)]
    if not candidates:
        return None
    for m in reversed(msgs):
        if m.from_me:
            continue
        for pattern, ru, en in candidates:
            if not m.has(pattern):
                continue
            if pattern is lx.PRICE_OBJECTION and not _answers_price(msgs, m.index):
                continue
            return ru if lang == "ru" else en
    return None


def _action(msgs: Sequence[_Msg], stage: FunnelStage, niche: _Niche) -> Action:
    if stage == "consultation_booked":
        return "reserve"
    if stage in ("deal_closed", "deal_lost"):
        return "none"
    if niche.niche == "targetologist" or niche.job_seeker:
        return "want_work"
    if any(not m.from_me and m.has(lx.WANT_CALL) for m in msgs):
        return "want_call"
    return "none"


_NEXT: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "ask_business": (
            "Здравствуйте! Расскажите, пожалуйста, чем занимается ваш бизнес и какую задачу "
            "хотите решить рекламой?",
            "Hello! Could you tell me a bit about your business and what you want advertising "
            "to achieve?",
        ),
        "ask_owner": (
            "Подскажите, пожалуйста, вы владелец бизнеса или отвечаете за маркетинг?",
            "Could you tell me whether you own the business or are responsible for marketing?",
        ),
        "ask_budget": (
            "Какой бюджет на рекламу в месяц вы рассматриваете?",
            "What monthly advertising budget are you considering?",
        ),
        "qualified": (
            "Предлагаю короткий созвон на 20 минут: покажу кейсы и стратегию под ваши задачи. "
            "Когда вам удобно?",
            "Shall we have a short 20-minute call? I'll show relevant cases and a strategy for "
            "you. When suits you?",
        ),
        "consultation_booked": (
            "Напоминаю о нашей встрече, ссылку пришлю заранее. Если время изменится — напишите, "
            "пожалуйста.",
            "Just a reminder about our meeting; I'll send the link beforehand. Let me know if "
            "the time changes.",
        ),
        "consultation_completed": (
            "Спасибо за встречу! Подготовили предложение по итогам — когда удобно обсудить "
            "следующий шаг?",
            "Thanks for the meeting! We've prepared a proposal based on it — when can we discuss "
            "the next step?",
        ),
        "deal_closed": (
            "Спасибо за оплату! Пришлите, пожалуйста, доступы к рекламным кабинетам, и мы начнём "
            "запуск.",
            "Thank you for the payment! Please share access to your ad accounts and we'll start "
            "the launch.",
        ),
        "deal_lost": (
            "Спасибо, что сообщили! Если ситуация изменится — будем рады помочь, пишите в любое "
            "время.",
            "Thanks for letting us know! If anything changes, we'll be glad to help — write any "
            "time.",
        ),
        "not_fit": (
            "Спасибо за интерес! Сейчас не можем предложить сотрудничество, но сохраним ваш "
            "контакт.",
            "Thank you for your interest! We can't offer cooperation right now, but we'll keep "
            "your contact.",
        ),
        "refused": (
            "Понимаю. Чтобы назвать точную стоимость, нам важно понять задачу — можно задать "
            "пару коротких вопросов?",
            "I understand. To give an exact price we need to understand the task — may I ask a "
            "couple of short questions?",
        ),
        "too_small": (
            "Спасибо! С таким бюджетом реклама вряд ли окупится; когда будете готовы вложить "
            "больше — напишите, посчитаем.",
            "Thank you! With this budget ads are unlikely to pay off; when you're ready to "
            "invest more, write and we'll plan it.",
        ),
    }
)


def _next_message(stage: _Stage, niche: _Niche, is_owner: bool | None, lang: Lang) -> str:
    pick = 0 if lang == "ru" else 1
    if stage.stage == "not_qualified":
        return _NEXT[stage.why if stage.why in ("refused", "too_small") else "not_fit"][pick]
    if stage.stage == "new_lead":
        if not niche.business_known:
            return _NEXT["ask_business"][pick]
        return _NEXT["ask_owner" if is_owner is None else "ask_budget"][pick]
    return _NEXT[stage.stage][pick]


_WHY: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "no_client": (
            "Клиент ещё ничего не написал, поэтому это новый лид.",
            "The contact has not written anything yet, so this is a new lead.",
        ),
        "booked": (
            "Согласованы конкретные дата/время встречи",
            "A concrete meeting slot was agreed",
        ),
        "completed": (
            "Консультация уже состоялась (есть сообщения после встречи)",
            "The consultation already took place (messages follow it up)",
        ),
        "closed": (
            "Есть подтверждение оплаты или подписания договора",
            "Payment or a signed contract was confirmed",
        ),
        "lost": (
            "Клиент явно отказался, отменил или выбрал другого подрядчика",
            "The client explicitly declined, cancelled or chose another contractor",
        ),
        "silent_after_price": (
            "После возражения по цене клиент перестал отвечать",
            "The client stopped answering after a price objection",
        ),
        "targetologist": (
            "Контакт — таргетолог/SMM-специалист: предлагает услуги или ищет работу, а не рекламу",
            "The contact is a targetologist/SMM specialist offering services or seeking work",
        ),
        "job_seeker": ("Контакт ищет работу, а не рекламу", "The contact is looking for a job"),
        "not_business": ("Запрос не от бизнеса", "The request does not come from a business"),
        "too_small": ("Бюджет слишком мал для работы", "The budget is far too small"),
        "manager_not_fit": (
            "Менеджер ответил, что контакт не подходит",
            "The manager replied that the contact is not a fit",
        ),
        "refused": (
            "Клиент отказался отвечать на квалифицирующие вопросы",
            "The client refused to answer the qualifying questions",
        ),
        "qualified": (
            "Известны ниша, роль и бюджет, клиент проявляет интерес, но встреча не назначена",
            "Niche, role and budget are known and the client is interested, but no meeting is set",
        ),
        "new_lead": (
            "Квалификация не завершена: известно не всё из ниши, роли и бюджета",
            "Qualification is not complete: niche, role or budget is still unknown",
        ),
    }
)


def _reasoning(
    stage: _Stage, niche: _Niche, is_owner: bool | None, budget: _Money | None, lang: Lang
) -> str:
    pick = 0 if lang == "ru" else 1
    first = _WHY[stage.why][pick]
    if stage.why == "no_client":
        return first
    if stage.quote:
        first += f": «{stage.quote}»" if pick == 0 else f': "{stage.quote}"'
    kind = niche.business_type or ("не указан" if pick == 0 else "not stated")
    if pick == 0:
        owner = {True: "владелец", False: "не владелец", None: "роль неизвестна"}[is_owner]
        money = f"бюджет «{budget.phrase}»" if budget else "бюджет не назван"
        return f"{first}. Ниша: {niche.niche} ({kind}); {owner}; {money}."
    owner = {True: "owner", False: "not the owner", None: "role unknown"}[is_owner]
    money = f'budget "{budget.phrase}"' if budget else "no budget stated"
    return f"{first}. Niche: {niche.niche} ({kind}); {owner}; {money}."


# -- the analyzer ---------------------------------------------------------------------------


class RulesAnalyzer:
    """Deterministic facts from keyword and pattern rules (Russian and English).

    `analyze` runs the CPU work on worker threads, never on the event loop: every
    pattern pass is linear in the (bounded) text, so each `re` call is short and the loop
    gets the interpreter back within milliseconds; an analysis over `timeout` seconds
    counts as a transient failure.
    """

    name = "rules"

    def __init__(self, *, timeout: float = 120.0, workers: int = 2) -> None:
        self._timeout = timeout
        self._workers = workers
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def extract(self, dialog: Dialog) -> LeadFacts:
        return self.explain(dialog)[0]

    def explain(self, dialog: Dialog) -> tuple[LeadFacts, FactEvidence]:
        """The facts and the messages behind the ones the score stands on."""
        msgs = prepare(dialog.messages)
        # Everything the client wrote: patterns that rarely match are tried here once
        # before message by message.
        said = " \n ".join(m.text for m in msgs if not m.from_me)
        lang = _language(msgs)
        niche = _niche(msgs, said, lang)
        is_owner, owner_proof = _owner(msgs, niche.niche == "targetologist")
        budget = _budget(msgs, lang)
        stage = _stage(msgs, niche, is_owner, budget, owner_proof)
        facts = LeadFacts(
            niche=niche.niche,
            business_type=niche.business_type,
            is_owner=is_owner,
            has_sales_dept=_client_flag(
                msgs, said, lx.SALES_DEPT_YES, lx.SALES_DEPT_NO, lx.SALES_DEPT_QUESTION
            ),
            uses_ads_now=_client_flag(msgs, said, lx.ADS_NOW_YES, lx.ADS_NOW_NO, lx.ADS_QUESTION),
            ad_budget=budget.phrase if budget else None,
            instagram_url=_instagram(msgs, said),
            funnel_stage=stage.stage,
            main_intent=_intent(said, niche.niche),
            objection=_objection(msgs, said, lang),
            action=_action(msgs, stage.stage, niche),
            next_message=_next_message(stage, niche, is_owner, lang),
            reasoning=_reasoning(stage, niche, is_owner, budget, lang),
        )
        evidence = fact_evidence(
            {
                "funnel_stage": stage.proof,
                "niche": niche.proof,
                "is_owner": owner_proof,
                "ad_budget": budget.proof if budget else (),
            }
        )
        return facts, evidence

    async def analyze(self, dialog: Dialog) -> AnalysisResult:
        if self._pool is None:  # threads start on first use (many analyzers never run)
            self._pool = concurrent.futures.ThreadPoolExecutor(self._workers, "rules-analyzer")
        work = asyncio.get_running_loop().run_in_executor(self._pool, self.explain, dialog)
        try:
            facts, evidence = await asyncio.wait_for(work, self._timeout)
        except TimeoutError:
            raise AnalyzerUnavailableError(
                f"rules analysis took longer than {self._timeout:g} s (ANALYSIS_TIMEOUT)"
            ) from None
        return AnalysisResult(facts=facts, analyzer=self.name, usage=None, evidence=evidence)

    async def close(self) -> None:
        """Let the worker threads go (a running analysis finishes first)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
