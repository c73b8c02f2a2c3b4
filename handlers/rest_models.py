"""Request and response types of the REST API (`/dialogs/...`, `/ready`).

The handlers decode with these types and `/openapi.json` is generated from them, so the
documentation cannot drift from what is enforced. Parameter and body field names are the
original service's camelCase (`rename="camel"`); response rows keep the table's snake_case
column names, as the original's `select *` did.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, UnsetType

from service.adapters.stores.base import LeadQuery, LeadStats
from service.domain.facts import Action, FunnelStage, InterestLevel, MainIntent, Niche
from service.domain.history import FunnelRow, HistoryEntry
from service.domain.lead import LeadOut, NewLead
from service.usecases.backfill import AnalyzeStats

# PostgreSQL text cannot hold NUL; refusing it here keeps such input a 400, not a 500.
_NO_NUL = r"^[^\x00]*$"


def _text(max_length: int, description: str = "") -> Any:
    return Meta(max_length=max_length, pattern=_NO_NUL, description=description or None)


AccountId = Annotated[uuid.UUID, Meta(description="The user account (UUID) the leads belong to")]
InstanceName = Annotated[
    str,
    Meta(min_length=1, max_length=200, pattern=_NO_NUL, description="Evolution instance name"),
]
Score0To100 = Annotated[int, Meta(ge=0, le=100)]
ShortText = Annotated[str, _text(300)]
MediumText = Annotated[str, _text(2000)]
LongText = Annotated[str, _text(10_000)]
# Digits with the usual separators as people type them: "+7 (701) 234-56-01".
PhoneText = Annotated[
    str,
    Meta(
        pattern=r"^\+?[0-9 ()\-.]{7,40}$",
        description="Phone number; separators are removed, 7 to 15 digits remain",
    ),
]

MAX_PAGE = 1000


# -- query parameters ---------------------------------------------------------------------
class StatsParams(msgspec.Struct, kw_only=True, rename="camel"):
    user_account_id: AccountId
    instance_name: InstanceName | None = None


class AccountParams(msgspec.Struct, kw_only=True, rename="camel"):
    user_account_id: AccountId


class LeadFilterParams(msgspec.Struct, kw_only=True, rename="camel"):
    """Filters shared by the list and the CSV export."""

    user_account_id: AccountId
    instance_name: InstanceName | None = None
    interest_level: InterestLevel | None = None
    min_score: Annotated[int, Meta(ge=0, le=100, description="Lowest score included")] | None = None
    funnel_stage: FunnelStage | None = None
    qualification_complete: (
        Annotated[bool, Meta(description="All four qualification questions answered")] | None
    ) = None

    def to_query(self, *, limit: int = 100, offset: int = 0) -> LeadQuery:
        return LeadQuery(
            user_account_id=self.user_account_id,
            instance_name=self.instance_name,
            interest_level=self.interest_level,
            min_score=self.min_score,
            funnel_stage=self.funnel_stage,
            qualification_complete=self.qualification_complete,
            limit=limit,
            offset=offset,
        )


class ExportParams(LeadFilterParams, kw_only=True, rename="camel"):
    """`GET /dialogs/export-csv`: every list filter; all matching rows, no paging."""


class HistoryParams(msgspec.Struct, kw_only=True, rename="camel"):
    """`GET /dialogs/leads/{id}/history`."""

    user_account_id: AccountId
    limit: Annotated[int, Meta(ge=1, le=MAX_PAGE, description="Page size (1-1000)")] = 100
    offset: Annotated[int, Meta(ge=0, le=1_000_000_000, description="Entries to skip")] = 0


class FunnelParams(msgspec.Struct, kw_only=True, rename="camel"):
    """`GET /dialogs/funnel`: the period is [since, until); a time without offset is UTC."""

    user_account_id: AccountId
    since: Annotated[datetime, Meta(description="Start of the period (ISO-8601, included)")]
    until: (
        Annotated[datetime, Meta(description="End of the period (ISO-8601, excluded; default now)")]
        | None
    ) = None
    instance_name: InstanceName | None = None


class AnalysisListParams(LeadFilterParams, kw_only=True, rename="camel"):
    limit: Annotated[int, Meta(ge=1, le=MAX_PAGE, description="Page size (1-1000)")] = 100
    offset: Annotated[int, Meta(ge=0, le=1_000_000_000, description="Rows to skip")] = 0

    def lead_query(self) -> LeadQuery:
        return self.to_query(limit=self.limit, offset=self.offset)


# -- request bodies -----------------------------------------------------------------------
class LeadCreateBody(msgspec.Struct, kw_only=True, rename="camel", forbid_unknown_fields=True):
    """`POST /dialogs/leads`: the original's body plus optional facts."""

    phone: PhoneText
    user_account_id: AccountId
    instance_name: InstanceName
    funnel_stage: FunnelStage
    contact_name: Annotated[str, _text(300)] | None = None
    business_type: ShortText | None = None
    is_medical: bool | None = None
    notes: LongText | None = None
    niche: Niche | None = None
    is_owner: bool | None = None
    has_sales_dept: bool | None = None
    uses_ads_now: bool | None = None
    ad_budget: ShortText | None = None
    instagram_url: ShortText | None = None
    main_intent: MainIntent | None = None
    objection: MediumText | None = None
    next_message: MediumText | None = None
    action: Action | None = None

    def new_lead(self, phone: str) -> NewLead:
        """The lead to create, for the normalised `phone`."""
        identity = ("phone", "user_account_id", "instance_name")
        given = {name: getattr(self, name) for name in self.__struct_fields__}
        return NewLead(
            instance_name=self.instance_name,
            user_account_id=self.user_account_id,
            contact_phone=phone,
            given={name: value for name, value in given.items() if name not in identity},
        )


class LeadPatchBody(msgspec.Struct, kw_only=True, rename="camel", forbid_unknown_fields=True):
    """`PATCH /dialogs/leads/{id}`: only the fields given change (null clears a value)."""

    user_account_id: AccountId
    contact_name: ShortText | UnsetType | None = UNSET
    business_type: ShortText | UnsetType | None = UNSET
    niche: Niche | UnsetType = UNSET
    is_medical: bool | UnsetType | None = UNSET
    is_owner: bool | UnsetType | None = UNSET
    has_sales_dept: bool | UnsetType | None = UNSET
    uses_ads_now: bool | UnsetType | None = UNSET
    ad_budget: ShortText | UnsetType | None = UNSET
    sent_instagram: bool | UnsetType | None = UNSET
    instagram_url: ShortText | UnsetType | None = UNSET
    has_booking: bool | UnsetType | None = UNSET
    funnel_stage: FunnelStage | UnsetType = UNSET
    interest_level: InterestLevel | UnsetType = UNSET
    main_intent: MainIntent | UnsetType = UNSET
    objection: MediumText | UnsetType | None = UNSET
    # NOT NULL in the original's table: "" clears it.
    next_message: MediumText | UnsetType = UNSET
    action: Action | UnsetType = UNSET
    notes: LongText | UnsetType | None = UNSET
    score: Score0To100 | UnsetType = UNSET

    def changes(self) -> dict[str, Any]:
        """Column -> value of every field given (the field names are the columns)."""
        return {
            name: value
            for name in self.__struct_fields__
            if name != "user_account_id" and (value := getattr(self, name)) is not UNSET
        }


class AnalyzeBody(msgspec.Struct, kw_only=True, rename="camel", forbid_unknown_fields=True):
    """`POST /dialogs/analyze`: analyse an instance's contacts now."""

    instance_name: InstanceName
    user_account_id: AccountId
    min_incoming: Annotated[
        int, Meta(ge=1, le=10_000, description="Incoming messages needed for an analysis")
    ] = 3
    max_dialogs: (
        Annotated[int, Meta(ge=1, le=1_000_000, description="At most this many analyses")] | None
    ) = None
    max_contacts: (
        Annotated[int, Meta(ge=1, le=1_000_000, description="At most this many contacts")] | None
    ) = None


# -- responses ----------------------------------------------------------------------------
class AnalysisListResponse(msgspec.Struct, kw_only=True):
    success: bool
    results: list[LeadOut]
    count: Annotated[int, Meta(description="All rows matching the filters (not the page size)")]


class StatsResponse(msgspec.Struct, kw_only=True):
    success: bool
    stats: LeadStats


class HistoryResponse(msgspec.Struct, kw_only=True):
    success: bool
    history: Annotated[list[HistoryEntry], Meta(description="Newest first")]
    count: Annotated[int, Meta(description="All entries of the lead (not the page size)")]


class FunnelResponse(msgspec.Struct, kw_only=True):
    success: bool
    funnel: Annotated[
        dict[str, FunnelRow],
        Meta(description="Per stage (every stage of the funnel, in its order)"),
    ]


class LeadResponse(msgspec.Struct, kw_only=True):
    success: bool
    lead: LeadOut


class AnalyzeResponse(msgspec.Struct, kw_only=True):
    success: bool
    stats: AnalyzeStats


class DeleteResponse(msgspec.Struct, kw_only=True):
    success: bool
    id: uuid.UUID


class ErrorResponse(msgspec.Struct, kw_only=True):
    success: bool
    error: Annotated[str, Meta(description="What is wrong, in one line")]
    details: dict[str, Any] | None = None


class HealthResponse(msgspec.Struct, kw_only=True):
    ok: bool
    service: str


class ReadyResponse(msgspec.Struct, kw_only=True):
    ok: bool
    checks: Annotated[
        dict[str, str],
        Meta(
            description="broker, results_db, evolution_db (and llm_model with the OpenAI "
            "analyzer): 'ok', 'warning: …' (passes) or why it is down"
        ),
    ]
    error: str | None = None


# -- endpoint table (routes and /openapi.json are both built from it) ---------------------
@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    summary: str
    query: type[msgspec.Struct] | None = None
    body: type[msgspec.Struct] | None = None
    response: type[msgspec.Struct] | None = None
    status: int = 200
    # Non-JSON success bodies (CSV, Prometheus text) are described by media type only.
    media_type: str = "application/json"
    errors: tuple[int, ...] = (400, 401)
    auth: bool = True
    description: str = ""
    path_params: tuple[str, ...] = ()
    tag: str = "dialogs"
