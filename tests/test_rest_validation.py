"""Authentication and input validation: every bad input is a JSON 400 naming the field."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.rest_support import (
    API_TOKEN,
    INSTANCE,
    Api,
    insert_leads,
    lead_values,
    open_api,
    pg_api_fixture,  # noqa: F401 - fixture
)

ACCOUNT = str(uuid.uuid4())
LEAD = str(uuid.uuid4())


# -- authentication -------------------------------------------------------------------------
PROTECTED = [
    ("GET", f"/dialogs/analysis?userAccountId={ACCOUNT}"),
    ("GET", f"/dialogs/stats?userAccountId={ACCOUNT}"),
    ("GET", f"/dialogs/export-csv?userAccountId={ACCOUNT}"),
    ("POST", "/dialogs/leads"),
    ("PATCH", f"/dialogs/leads/{LEAD}"),
    ("DELETE", f"/dialogs/analysis/{LEAD}?userAccountId={ACCOUNT}"),
    ("POST", "/dialogs/analyze"),
    ("GET", "/ready"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/no/such/path"),
]


async def test_every_endpoint_but_health_needs_the_token(pg_api: Api) -> None:
    wrong = [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {API_TOKEN}x"},
        {"Authorization": f"Basic {API_TOKEN}"},
        {"Authorization": API_TOKEN},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer \u00e9t\u00e9"},
        {"X-Api-Key": API_TOKEN},
    ]
    for method, path in PROTECTED:
        for headers in wrong:
            status, body = await pg_api.call(method, path, headers=headers, auth=False)
            assert status == 401, (method, path, headers)
            assert body["success"] is False and body["error"], (method, path)
    status, body = await pg_api.call("GET", "/health", auth=False)
    assert status == 200 and body == {"ok": True, "service": "crm-backend"}

    # The scheme is case-insensitive (RFC 7235); the token is not.
    status, _ = await pg_api.call(
        "GET",
        f"/dialogs/stats?userAccountId={ACCOUNT}",
        headers={"Authorization": f"bearer {API_TOKEN}"},
        auth=False,
    )
    assert status == 200
    status, _ = await pg_api.call(
        "GET",
        f"/dialogs/stats?userAccountId={ACCOUNT}",
        headers={"Authorization": f"Bearer {API_TOKEN.upper()}"},
        auth=False,
    )
    assert status == 401


async def test_webhook_routes_use_their_own_auth(pg_api: Api) -> None:
    # No bearer token needed to reach the webhook handler; its own check answers.
    status, body = await pg_api.call("POST", "/webhooks/evolution", json={}, auth=False)
    assert status == 401 and body["ok"] is False


async def test_auth_disabled_opens_everything(results_dsn: str, account: uuid.UUID) -> None:
    async with open_api("postgres", results_dsn, account, auth_disabled="true") as api:
        for path in ("/dialogs/stats", "/metrics", "/openapi.json"):
            status, _ = await api.call(
                "GET", path, params={"userAccountId": str(account)}, auth=False
            )
            assert status == 200, path


async def test_no_configured_token_refuses_all(results_dsn: str, account: uuid.UUID) -> None:
    async with open_api("postgres", results_dsn, account, api_token="") as api:
        status, body = await api.call("GET", "/dialogs/stats", params={"userAccountId": ACCOUNT})
        assert status == 401 and "API_TOKEN" in body["error"]


# -- query parameters -------------------------------------------------------------------------
BAD_QUERIES: list[tuple[str, dict[str, str], str]] = [
    ("/dialogs/analysis", {}, "userAccountId"),
    ("/dialogs/analysis", {"userAccountId": "not-a-uuid"}, "userAccountId"),
    ("/dialogs/analysis", {"userAccountId": "123"}, "userAccountId"),
    ("/dialogs/analysis", {"userAccountId": ACCOUNT, "interestLevel": "lukewarm"}, "interestLevel"),
    ("/dialogs/analysis", {"userAccountId": ACCOUNT, "interestLevel": "HOT"}, "interestLevel"),
    ("/dialogs/analysis", {"userAccountId": ACCOUNT, "minScore": "101"}, "minScore"),
    ("/dialogs/analysis", {"userAccountId": ACCOUNT, "minScore": "-1"}, "minScore"),
    ("/dialogs/analysis", {"userAccountId": ACCOUNT, "minScore": "7.5"}, "minScore"),
    ("/dialogs/analysis", {"userAccountId": ACCOUNT, "minScore": "seventy"}, "minScore"),
    ("/dialogs/analysis", {"userAccountId": ACCOUNT, "minScore": "1e3"}, "minScore"),
    ("/dialogs/analysis", {"userAccountId": ACCOUNT, "funnelStage": "won"}, "funnelStage"),
    (
        "/dialogs/analysis",
        {"userAccountId": ACCOUNT, "qualificationComplete": "yes"},
        "qualificationComplete",
    ),
    ("/dialogs/analysis", {"userAccountId": ACCOUNT, "limit": "-1"}, "limit"),
    ("/dialogs/analysis", {"userAccountId": ACCOUNT, "limit": "0"}, "limit"),
    ("/dialogs/analysis", {"userAccountId": ACCOUNT, "limit": "1001"}, "limit"),
    ("/dialogs/analysis", {"userAccountId": ACCOUNT, "limit": "99999999999999999999"}, "limit"),
    ("/dialogs/analysis", {"userAccountId": ACCOUNT, "offset": "-5"}, "offset"),
    ("/dialogs/analysis", {"userAccountId": ACCOUNT, "offset": "2000000000"}, "offset"),
    ("/dialogs/analysis", {"userAccountId": ACCOUNT, "instanceName": "a\x00b"}, "instanceName"),
    ("/dialogs/analysis", {"userAccountId": ACCOUNT, "instanceName": "x" * 201}, "instanceName"),
    ("/dialogs/stats", {"userAccountId": "zzz"}, "userAccountId"),
    ("/dialogs/stats", {}, "userAccountId"),
    ("/dialogs/export-csv", {"userAccountId": ACCOUNT, "minScore": "abc"}, "minScore"),
    ("/dialogs/export-csv", {}, "userAccountId"),
]


async def test_bad_query_parameters_are_400_naming_the_field(pg_api: Api) -> None:
    for path, params, field in BAD_QUERIES:
        status, body = await pg_api.call("GET", path, params=params)
        assert status == 400, (path, params, body)
        assert body["success"] is False
        assert field in body["error"], (params, body["error"])
        assert body["details"]["field"] == field
        assert body["details"]["expected"]


async def test_query_parameter_messages_say_what_is_expected(pg_api: Api) -> None:
    cases = {
        "minScore=101": "query parameter minScore must be a whole number from 0 to 100",
        "interestLevel=x": "query parameter interestLevel must be one of cold, hot, warm",
        "qualificationComplete=maybe": "query parameter qualificationComplete must be "
        "true or false",
        "limit=5000": "query parameter limit must be a whole number from 1 to 1000",
    }
    for query, message in cases.items():
        status, body = await pg_api.call(
            "GET", f"/dialogs/analysis?userAccountId={ACCOUNT}&{query}"
        )
        assert status == 400 and body["error"] == message


async def test_query_conversions_and_leniency(pg_api: Api) -> None:
    await insert_leads(
        pg_api.results_dsn,
        [lead_values(pg_api.account, 1, score=80, qualification_complete=True)],
    )
    acct = str(pg_api.account)
    for query in (
        "minScore=70&qualificationComplete=true",
        "minScore=70&qualificationComplete=1",
        "minScore=&interestLevel=&instanceName=",  # empty = not given (forms send these)
        "unknownParam=1&_=1700000000",  # unknown parameters are ignored, as before
    ):
        status, body = await pg_api.call("GET", f"/dialogs/analysis?userAccountId={acct}&{query}")
        assert status == 200, (query, body)
        assert body["count"] == 1, query
    status, body = await pg_api.call(
        "GET", f"/dialogs/analysis?userAccountId={acct}&minScore=1&minScore=2"
    )
    assert status == 400 and "more than once" in body["error"]
    # Percent-encoded junk is still only a bad value.
    status, body = await pg_api.call(
        "GET", f"/dialogs/analysis?userAccountId={acct}&instanceName=%ff%fe%00"
    )
    assert status == 400 and body["details"]["field"] == "instanceName"


# -- JSON bodies ------------------------------------------------------------------------------
def create_body(**fields: Any) -> dict[str, Any]:
    body = {
        "phone": "+7 701 234 56 01",
        "userAccountId": ACCOUNT,
        "instanceName": INSTANCE,
        "funnelStage": "qualified",
    }
    body.update(fields)
    return {k: v for k, v in body.items() if v is not ...}


BAD_BODIES: list[tuple[str, str, Any, str | None]] = [
    # (method, path, body (dict → JSON, bytes raw), field named or None)
    ("POST", "/dialogs/leads", b"{", None),
    ("POST", "/dialogs/leads", b"", None),
    ("POST", "/dialogs/leads", b"null", None),
    ("POST", "/dialogs/leads", b"[]", None),
    ("POST", "/dialogs/leads", b'"text"', None),
    ("POST", "/dialogs/leads", b"\xff\xfe{}", None),
    ("POST", "/dialogs/leads", b'{"phone": "\\ud800"}', None),
    ("POST", "/dialogs/leads", create_body(phone=...), "phone"),
    ("POST", "/dialogs/leads", create_body(phone="12"), "phone"),
    ("POST", "/dialogs/leads", create_body(phone="call me"), "phone"),
    ("POST", "/dialogs/leads", create_body(phone=77012345601), "phone"),
    ("POST", "/dialogs/leads", create_body(phone="+1 (234) 567-89-01-23-45-67"), "phone"),
    ("POST", "/dialogs/leads", create_body(userAccountId="x"), "userAccountId"),
    ("POST", "/dialogs/leads", create_body(userAccountId=None), "userAccountId"),
    ("POST", "/dialogs/leads", create_body(instanceName=...), "instanceName"),
    ("POST", "/dialogs/leads", create_body(instanceName=""), "instanceName"),
    ("POST", "/dialogs/leads", create_body(instanceName=["a"]), "instanceName"),
    ("POST", "/dialogs/leads", create_body(funnelStage="won"), "funnelStage"),
    ("POST", "/dialogs/leads", create_body(funnelStage=...), "funnelStage"),
    ("POST", "/dialogs/leads", create_body(isMedical="yes"), "isMedical"),
    ("POST", "/dialogs/leads", create_body(isOwner=1), "isOwner"),
    ("POST", "/dialogs/leads", create_body(niche="dentist"), "niche"),
    ("POST", "/dialogs/leads", create_body(notes={"a": 1}), "notes"),
    ("POST", "/dialogs/leads", create_body(notes="x" * 10_001), "notes"),
    ("POST", "/dialogs/leads", create_body(contactName="a\x00b"), "contactName"),
    ("POST", "/dialogs/leads", create_body(score=99), "score"),  # not a create field
    ("POST", "/dialogs/leads", create_body(contact_name="snake"), "contact_name"),
    ("PATCH", f"/dialogs/leads/{LEAD}", {}, "userAccountId"),
    ("PATCH", f"/dialogs/leads/{LEAD}", {"userAccountId": ACCOUNT}, None),
    ("PATCH", f"/dialogs/leads/{LEAD}", {"userAccountId": ACCOUNT, "score": 101}, "score"),
    ("PATCH", f"/dialogs/leads/{LEAD}", {"userAccountId": ACCOUNT, "score": 5.5}, "score"),
    ("PATCH", f"/dialogs/leads/{LEAD}", {"userAccountId": ACCOUNT, "score": "50"}, "score"),
    ("PATCH", f"/dialogs/leads/{LEAD}", {"userAccountId": ACCOUNT, "score": None}, "score"),
    (
        "PATCH",
        f"/dialogs/leads/{LEAD}",
        {"userAccountId": ACCOUNT, "interestLevel": "tepid"},
        "interestLevel",
    ),
    (
        "PATCH",
        f"/dialogs/leads/{LEAD}",
        {"userAccountId": ACCOUNT, "funnelStage": None},
        "funnelStage",
    ),
    (
        "PATCH",
        f"/dialogs/leads/{LEAD}",
        {"userAccountId": ACCOUNT, "nextMessage": None},
        "nextMessage",
    ),
    ("PATCH", f"/dialogs/leads/{LEAD}", {"userAccountId": ACCOUNT, "phone": "7701"}, "phone"),
    ("PATCH", f"/dialogs/leads/{LEAD}", {"userAccountId": ACCOUNT, "source": "auto"}, "source"),
    ("PATCH", "/dialogs/leads/not-a-uuid", {"userAccountId": ACCOUNT, "notes": "x"}, "id"),
    ("POST", "/dialogs/analyze", {"userAccountId": ACCOUNT}, "instanceName"),
    ("POST", "/dialogs/analyze", {"instanceName": INSTANCE}, "userAccountId"),
    (
        "POST",
        "/dialogs/analyze",
        {"instanceName": INSTANCE, "userAccountId": ACCOUNT, "minIncoming": 0},
        "minIncoming",
    ),
    (
        "POST",
        "/dialogs/analyze",
        {"instanceName": INSTANCE, "userAccountId": ACCOUNT, "maxDialogs": -3},
        "maxDialogs",
    ),
    (
        "POST",
        "/dialogs/analyze",
        {"instanceName": INSTANCE, "userAccountId": ACCOUNT, "maxContacts": "10"},
        "maxContacts",
    ),
    (
        "POST",
        "/dialogs/analyze",
        {"instanceName": INSTANCE, "userAccountId": ACCOUNT, "force": True},
        "force",
    ),
    ("DELETE", "/dialogs/analysis/123", None, "id"),
]


async def test_bad_bodies_are_400(pg_api: Api) -> None:
    for method, path, body, field in BAD_BODIES:
        if isinstance(body, bytes):
            status, answer = await pg_api.call(method, path, data=body)
        elif method == "DELETE":
            status, answer = await pg_api.call(method, path, params={"userAccountId": ACCOUNT})
        else:
            status, answer = await pg_api.call(method, path, json=body)
        assert status == 400, (method, path, body, answer)
        assert answer["success"] is False and answer["error"]
        if field is not None:
            assert field in answer["error"], (body, answer["error"])
            assert answer["details"]["field"] == field, (body, answer)


async def test_body_messages_say_what_is_expected(pg_api: Api) -> None:
    status, body = await pg_api.call("POST", "/dialogs/leads", json=create_body(extra=1))
    assert status == 400
    assert body["error"] == "unknown field extra"
    assert "isOwner" in body["details"]["allowed"]
    status, body = await pg_api.call("POST", "/dialogs/leads", json=create_body(isOwner="yes"))
    assert body["error"] == "field isOwner must be true or false or null"
    status, body = await pg_api.call("POST", "/dialogs/leads", json=create_body(funnelStage=...))
    assert body["error"].startswith("funnelStage is required (one of consultation_booked")
    status, body = await pg_api.call("POST", "/dialogs/leads", data=b"{not json")
    assert body["error"].startswith("request body is not valid JSON")


async def test_oversized_body_is_413(pg_api: Api) -> None:
    big = create_body(notes="x" * (2 * 1024 * 1024))
    status, body = await pg_api.call("POST", "/dialogs/leads", json=big)
    assert status == 413 and body["success"] is False


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("PUT", f"/dialogs/analysis/{LEAD}", 405), ("GET", "/dialogs/nothing", 404)],
)
async def test_routing_errors_are_json(pg_api: Api, method: str, path: str, status: int) -> None:
    got, body = await pg_api.call(method, path)
    assert got == status
    assert body["success"] is False and path in body["error"]
