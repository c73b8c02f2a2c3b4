"""A lead's history and the funnel report drawn from it (pure types, no I/O).

Every change of `funnel_stage`, `score` or `interest_level` is one entry, written by the
store's write rules in the same transaction as the change (service/sql/0006_lead_history.sql).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

from service.domain.facts import FUNNEL_STAGES

CauseKind = Literal["analysis", "manual", "delete"]
HistoryField = Literal["funnel_stage", "score", "interest_level"]

# The funnel's order: a stage later in this tuple is a later stage (deal_lost, the other
# way out, comes last). One list: the report takes it from here.
FUNNEL_ORDER: tuple[str, ...] = FUNNEL_STAGES


class Cause(msgspec.Struct, kw_only=True, omit_defaults=False):
    """Why a lead changed.

    - `analysis`: an automatic (re-)analysis; `analyzer` and `model` name what ran (both
      null for a `new_lead` refresh of a contact under the threshold);
    - `manual`: a person's edit; `key` names the credential (an API key's public prefix,
      `user:<id>` for a Supabase user, `admin` for API_TOKEN), never a secret;
    - `delete`: the re-analysis after messages were deleted in WhatsApp.
    """

    kind: CauseKind
    analyzer: str | None = None
    model: str | None = None
    key: str | None = None


class HistoryEntry(msgspec.Struct, kw_only=True, omit_defaults=False, rename={"from_": "from"}):
    changed_at: datetime
    field: HistoryField
    from_: Any
    to: Any
    cause: Cause


class HistoryPage(msgspec.Struct, kw_only=True):
    history: list[HistoryEntry]
    count: int  # entries of the lead in all


class FunnelRow(msgspec.Struct, kw_only=True):
    """One stage of the funnel report over a period."""

    entered: int  # leads whose stage became this one in the period (a first stage too)
    moved_to: dict[str, int]  # of those, how many reached each later stage since
    median_hours_to: dict[str, float]  # median hours from entering this to reaching that


def manual_cause(key: str | None) -> Cause:
    return Cause(kind="manual", key=key)
