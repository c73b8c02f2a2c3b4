"""The strict JSON schema of the model's answer for Chat Completions Structured Outputs.

The answer is `LeadFacts` plus `evidence`: per fact the score stands on, the numbers of
the messages (as numbered in the prompt) that show it. Generated from the msgspec types,
so the schema and the facts decoder can never disagree, then reshaped into the subset
OpenAI's strict mode accepts: every object lists all its properties in `required` and
sets `additionalProperties: false`, references are inlined, nullable values become type
lists, string enums carry `"type": "string"`, and every field gets a description (kept
below, next to the schema)."""

from __future__ import annotations

import functools
from typing import Any

import msgspec
from openai.types.shared_params.response_format_json_schema import ResponseFormatJSONSchema

from service.domain.evidence import EVIDENCE_FACTS
from service.domain.facts import LeadFacts


class FactIndexes(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Message numbers (the prompt's `#N`) behind each fact the score stands on."""

    funnel_stage: list[int]
    niche: list[int]
    is_owner: list[int]
    ad_budget: list[int]


class LeadAnswer(LeadFacts, kw_only=True, forbid_unknown_fields=True):
    """What the model returns: the facts, then the evidence for them."""

    evidence: FactIndexes


SCHEMA_NAME = "lead_facts"
SCHEMA_DESCRIPTION = "Lead facts extracted from one WhatsApp sales dialog."

# What each fact means, as the model reads it next to the field.
FIELD_DESCRIPTIONS: dict[str, str] = {
    "niche": (
        "The client's business niche. medicine: clinics, dentistry, cosmetology, "
        "aesthetic and other medical practices. infobusiness: online schools, courses, "
        "coaches, experts selling knowledge (a nutritionist selling an online course is "
        "infobusiness). targetologist: the contact is a freelance targetologist/SMM/ads "
        "contractor offering services, reselling leads or seeking a job or internship "
        "(an in-house marketer of a business takes that business's niche). other: any "
        "other business, or nothing known yet."
    ),
    "business_type": (
        "The client's business in a few words, in the dialog's language "
        "(e.g. стоматология, онлайн-школа английского); null when unknown."
    ),
    "is_owner": (
        "Qualification question 1: is the contact the owner/founder/co-owner (decision "
        "maker)? true, false (employee, manager, hired doctor, contractor), or null when "
        "not answered."
    ),
    "has_sales_dept": (
        "Qualification question 2: does the business have a sales department or people "
        "handling incoming leads? null when not answered."
    ),
    "uses_ads_now": (
        "Qualification question 3: is the business running paid ads right now? "
        "null when not answered."
    ),
    "ad_budget": (
        "Qualification question 4: the monthly advertising budget exactly as the client "
        "put it (e.g. '500 тыс тенге', '$2000'); null when the client did not state one."
    ),
    "instagram_url": (
        "The client's Instagram profile link or @handle if the client sent it; else null."
    ),
    "funnel_stage": "The sales funnel stage the dialog has reached (see the definitions).",
    "main_intent": (
        "What the client mainly wants. clinic_lead: a medical business wanting patients "
        "or leads. ai_targetolog: interest in the AI targetologist product. "
        "marketing_analysis: an audit or analysis of their marketing. other: anything else."
    ),
    "objection": (
        "The client's main objection in a short phrase (price, timing, trust, has another "
        "agency); null when there is none."
    ),
    "action": (
        "What the client asked for. want_call: a call or meeting. want_work: to start "
        "working together or pay. reserve: to reserve a slot or postpone to a later date. "
        "none: nothing yet."
    ),
    "next_message": (
        "The manager's suggested next message to the client, in the dialog's language, "
        "moving the lead one step further."
    ),
    "reasoning": "Why these facts and this stage, in two or three sentences.",
    "evidence": (
        "For each fact the numbers N of the dialog's messages (#N) that show it, at most "
        "three, most telling first; [] when none does or the fact is null."
    ),
}
EVIDENCE_DESCRIPTIONS: dict[str, str] = {
    "funnel_stage": "Messages that show the stage (e.g. where the meeting was agreed).",
    "niche": "Messages where the client's business is named.",
    "is_owner": "Messages where the client's role is told.",
    "ad_budget": "Messages where the budget was named.",
}

# Keywords strict mode accepts in the shapes this schema uses; anything else is an error
# here rather than a 400 from the API at run time.
_KEEP = frozenset(
    {"type", "properties", "required", "additionalProperties", "enum", "anyOf", "items"}
)
_DROP = frozenset({"title", "default", "$schema", "examples"})


class SchemaError(ValueError):
    """The facts type uses a shape strict mode cannot express."""


def lead_facts_schema() -> dict[str, Any]:
    """The strict-mode JSON schema of `LeadFacts` (a fresh dict on every call)."""
    result: dict[str, Any] = msgspec.json.decode(lead_facts_schema_json())
    return result


@functools.cache
def lead_facts_schema_json() -> bytes:
    """The schema as JSON bytes, built once: generating it costs milliseconds."""
    return msgspec.json.encode(_build_schema())


def _build_schema() -> dict[str, Any]:
    generated = msgspec.json.schema(LeadAnswer)
    defs: dict[str, Any] = generated.get("$defs", {})
    root = _strict(generated, defs, seen=())
    if root.get("type") != "object":
        raise SchemaError("the root of a strict schema must be an object")
    props: dict[str, Any] = root["properties"]
    missing = set(props) - set(FIELD_DESCRIPTIONS)
    if missing:
        raise SchemaError(f"fields without a description: {sorted(missing)}")
    for name, prop in props.items():
        prop["description"] = FIELD_DESCRIPTIONS[name]
    cited: dict[str, Any] = props["evidence"]["properties"]
    if set(cited) != set(EVIDENCE_FACTS) or set(cited) != set(EVIDENCE_DESCRIPTIONS):
        raise SchemaError("the evidence must name exactly the facts a score stands on")
    for name, prop in cited.items():
        prop["description"] = EVIDENCE_DESCRIPTIONS[name]
    # The type's docstring speaks to developers; the model gets its own line.
    root["description"] = SCHEMA_DESCRIPTION
    return root


def response_format() -> ResponseFormatJSONSchema:
    """The `response_format` argument of `chat.completions.create`."""
    return {
        "type": "json_schema",
        "json_schema": {"name": SCHEMA_NAME, "strict": True, "schema": lead_facts_schema()},
    }


def _strict(node: dict[str, Any], defs: dict[str, Any], seen: tuple[str, ...]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is not None:
        name = ref.rsplit("/", 1)[-1]
        if name in seen:
            raise SchemaError(f"recursive type {name} cannot be inlined")
        if name not in defs:
            raise SchemaError(f"unresolved reference {ref}")
        return _strict(defs[name], defs, (*seen, name))

    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or key == "$defs":
            continue
        if key == "description":
            out[key] = value
        elif key not in _KEEP:
            raise SchemaError(f"keyword {key!r} is not supported by strict mode")
        elif key == "properties":
            out[key] = {k: _strict(v, defs, seen) for k, v in value.items()}
        elif key == "anyOf":
            out[key] = [_strict(v, defs, seen) for v in value]
        elif key == "items":
            out[key] = _strict(value, defs, seen)
        else:
            out[key] = value

    if "properties" in out:
        out["type"] = "object"
        # Strict mode: every property is required (absence is expressed as null) and no
        # extra keys may appear.
        out["required"] = list(out["properties"])
        out["additionalProperties"] = False
    enum = out.get("enum")
    if enum is not None and "type" not in out and all(isinstance(v, str) for v in enum):
        out["type"] = "string"
    return _collapse_nullable(out)


def _collapse_nullable(node: dict[str, Any]) -> dict[str, Any]:
    """`anyOf: [{type: X}, {type: null}]` → `type: [X, "null"]` (simple branches only)."""
    branches = node.get("anyOf")
    if not branches or not all(set(b) == {"type"} and isinstance(b["type"], str) for b in branches):
        return node
    collapsed = {k: v for k, v in node.items() if k != "anyOf"}
    collapsed["type"] = [b["type"] for b in branches]
    return collapsed
