"""Property-based: thousands of generated requests, never a 5xx, every answer as documented.

Requests mix valid values (taken from the same types the API documents) with junk of every
JSON type, out-of-range numbers, unknown fields and raw bytes. Each answer must be a
status the endpoint documents in `/openapi.json`, and a JSON answer must validate against
that document's schema for the status (jsonschema, draft 2020-12 as OpenAPI 3.1 uses).
"""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import quote

import jsonschema
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.domain.facts import FUNNEL_STAGES, INTEREST_LEVELS, NICHES
from tests.rest_support import (
    AUTH,
    INSTANCE,
    Api,
    insert_leads,
    lead_values,
    pg_api_fixture,  # noqa: F401 - fixture
)

FUZZ = settings(
    max_examples=450,
    deadline=None,
    derandomize=True,  # the same requests on every run: a failure is reproducible
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
junk_text = st.text(max_size=40) | st.sampled_from(["", " ", "null", "true", "\x00", "1e9", "%"])


def number_text(low: int, high: int) -> st.SearchStrategy[str]:
    inside = st.integers(min_value=low, max_value=high)
    around = st.integers(min_value=low - 1000, max_value=high + 10**12)
    return (inside | around).map(str) | st.floats(allow_nan=True).map(str)


@pytest.fixture
async def fuzz_api(pg_api: Api) -> dict[str, Any]:
    """The app with a few leads; the OpenAPI document it serves."""
    rows = [
        lead_values(pg_api.account, i, score=s, interest_level=lvl)
        for i, (s, lvl) in enumerate([(90, "hot"), (50, "warm"), (10, "cold")])
    ]
    ids = await insert_leads(pg_api.results_dsn, rows)
    status, doc = await pg_api.call("GET", "/openapi.json")
    assert status == 200
    return {"api": pg_api, "doc": doc, "ids": ids}


def check(doc: dict[str, Any], path: str, method: str, status: int, ctype: str, body: Any) -> None:
    """Status documented for this operation; a JSON body valid against its schema."""
    assert status < 500, (method, path, status, body)
    operation = doc["paths"][path][method.lower()]
    response = operation["responses"].get(str(status))
    assert response is not None, f"{method} {path} answered undocumented {status}: {body}"
    media = response.get("content", {}).get(ctype)
    assert media is not None, f"{method} {path} {status}: undocumented {ctype}"
    if ctype == "application/json":
        schema = {**media["schema"], "components": doc["components"]}
        jsonschema.Draft202012Validator(schema).validate(body)
    elif ctype == "text/csv":
        assert isinstance(body, str) and body.startswith("\ufeff")


async def send(
    state: dict[str, Any],
    method: str,
    template: str,
    url: str,
    *,
    json: Any = None,
    data: bytes | None = None,
) -> None:
    api: Api = state["api"]
    response = await api.client.request(
        method,
        url,
        data=data if json is None else msgspec.json.encode(json),
        headers=AUTH,
    )
    raw = await response.read()
    ctype = response.content_type
    body: Any = msgspec.json.decode(raw) if ctype == "application/json" else raw.decode()
    check(state["doc"], template, method, response.status, ctype, body)


# -- GET endpoints: query strings ---------------------------------------------------------
def account_values(state: dict[str, Any]) -> st.SearchStrategy[str]:
    return st.sampled_from([str(state["api"].account), str(uuid.uuid4())]) | junk_text


def list_params(state: dict[str, Any]) -> st.SearchStrategy[dict[str, str]]:
    return st.fixed_dictionaries(
        {},
        optional={
            "userAccountId": account_values(state),
            "instanceName": st.sampled_from([INSTANCE, "other"]) | junk_text,
            "interestLevel": st.sampled_from(INTEREST_LEVELS) | junk_text,
            "minScore": number_text(0, 100) | junk_text,
            "funnelStage": st.sampled_from(FUNNEL_STAGES) | junk_text,
            "qualificationComplete": st.sampled_from(["true", "false", "1", "0"]) | junk_text,
            "limit": number_text(1, 1000) | junk_text,
            "offset": number_text(0, 5000) | junk_text,
            "extra": junk_text,
        },
    )


def query_string(params: dict[str, str]) -> str:
    return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in params.items())


@pytest.mark.parametrize("path", ["/dialogs/analysis", "/dialogs/stats", "/dialogs/export-csv"])
@FUZZ
@given(data=st.data())
async def test_fuzz_get_endpoints(fuzz_api: dict[str, Any], path: str, data: st.DataObject) -> None:
    params = data.draw(list_params(fuzz_api))
    await send(fuzz_api, "GET", path, f"{path}?{query_string(params)}")


RAW_PAIRS = st.lists(
    st.tuples(
        st.sampled_from(["userAccountId", "minScore", "limit", "instanceName", "x"]),
        st.binary(max_size=12).map(lambda b: "".join(f"%{c:02X}" for c in b)),
    ),
    max_size=5,
)


@FUZZ
@given(pairs=RAW_PAIRS)
async def test_fuzz_raw_query_strings(
    fuzz_api: dict[str, Any], pairs: list[tuple[str, str]]
) -> None:
    """Percent-escapes of any bytes, repeated keys."""
    account = f"userAccountId={fuzz_api['api'].account}&"
    query = account + "&".join(f"{k}={v}" for k, v in pairs)
    await send(fuzz_api, "GET", "/dialogs/analysis", f"/dialogs/analysis?{query}")


# -- bodies ---------------------------------------------------------------------------------
def maybe(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return valid | json_values


def create_bodies(state: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    account = str(state["api"].account)
    return st.fixed_dictionaries(
        {},
        optional={
            "phone": maybe(st.from_regex(r"\+?[0-9 ()\-]{5,20}", fullmatch=True)),
            "userAccountId": maybe(st.sampled_from([account, str(uuid.uuid4())])),
            "instanceName": maybe(st.sampled_from([INSTANCE, "other"])),
            "funnelStage": maybe(st.sampled_from(FUNNEL_STAGES)),
            "contactName": maybe(st.text(max_size=20)),
            "businessType": maybe(st.text(max_size=20)),
            "isMedical": maybe(st.booleans()),
            "notes": maybe(st.text(max_size=50)),
            "niche": maybe(st.sampled_from(NICHES)),
            "isOwner": maybe(st.booleans() | st.none()),
            "adBudget": maybe(st.text(max_size=20)),
            "nextMessage": maybe(st.text(max_size=20)),
            "unknown": json_values,
        },
    )


def patch_bodies(state: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    account = str(state["api"].account)
    return st.fixed_dictionaries(
        {},
        optional={
            "userAccountId": maybe(st.sampled_from([account, str(uuid.uuid4())])),
            "score": maybe(st.integers(min_value=-5, max_value=105)),
            "interestLevel": maybe(st.sampled_from(INTEREST_LEVELS)),
            "funnelStage": maybe(st.sampled_from(FUNNEL_STAGES)),
            "niche": maybe(st.sampled_from(NICHES)),
            "isOwner": maybe(st.booleans() | st.none()),
            "adBudget": maybe(st.text(max_size=20) | st.none()),
            "notes": maybe(st.text(max_size=40) | st.none()),
            "nextMessage": maybe(st.text(max_size=20)),
            "hasBooking": maybe(st.booleans()),
            "contact_name": json_values,
        },
    )


def analyze_bodies(state: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    account = str(state["api"].account)
    return st.fixed_dictionaries(
        {},
        optional={
            "instanceName": maybe(st.sampled_from(["other", "unmapped"])),
            "userAccountId": maybe(st.sampled_from([account, str(uuid.uuid4())])),
            "minIncoming": maybe(st.integers(min_value=-2, max_value=20_000)),
            "maxDialogs": maybe(st.integers(min_value=-2, max_value=5)),
            "maxContacts": maybe(st.integers(min_value=-2, max_value=5)),
        },
    )


@FUZZ
@given(data=st.data())
async def test_fuzz_create_lead(fuzz_api: dict[str, Any], data: st.DataObject) -> None:
    body = data.draw(create_bodies(fuzz_api) | json_values)
    await send(fuzz_api, "POST", "/dialogs/leads", "/dialogs/leads", json=body)


@FUZZ
@given(data=st.data())
async def test_fuzz_patch_lead(fuzz_api: dict[str, Any], data: st.DataObject) -> None:
    lead = data.draw(
        st.sampled_from([*fuzz_api["ids"], str(uuid.uuid4())])
        | junk_text.filter(lambda s: s not in ("", ".", ".."))
    )
    body = data.draw(patch_bodies(fuzz_api) | json_values)
    url = f"/dialogs/leads/{quote(lead, safe='')}"
    await send(fuzz_api, "PATCH", "/dialogs/leads/{id}", url, json=body)


@FUZZ
@given(data=st.data())
async def test_fuzz_analyze_and_delete(fuzz_api: dict[str, Any], data: st.DataObject) -> None:
    body = data.draw(analyze_bodies(fuzz_api) | json_values)
    await send(fuzz_api, "POST", "/dialogs/analyze", "/dialogs/analyze", json=body)
    lead = data.draw(st.uuids().map(str) | junk_text.filter(lambda s: s not in ("", ".", "..")))
    url = f"/dialogs/analysis/{quote(lead, safe='')}?userAccountId={fuzz_api['api'].account}"
    await send(fuzz_api, "DELETE", "/dialogs/analysis/{id}", url)


@FUZZ
@given(raw=st.binary(max_size=200) | json_values.map(lambda v: repr(v).encode()))
async def test_fuzz_raw_bodies(fuzz_api: dict[str, Any], raw: bytes) -> None:
    await send(fuzz_api, "POST", "/dialogs/leads", "/dialogs/leads", data=raw)
