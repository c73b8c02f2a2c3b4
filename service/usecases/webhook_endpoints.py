"""Managing an account's webhook endpoints (`crm-backend notify add/list/remove`)."""

from __future__ import annotations

import uuid

from service.adapters.stores.webhooks import WebhookStore
from service.adapters.webhooks_out.signing import new_secret
from service.adapters.webhooks_out.targets import TargetPolicy, TargetRefusedError
from service.domain.webhooks import WebhookEndpoint, check_url, parse_events


class EndpointError(ValueError):
    """A URL or event list that cannot be an endpoint; the message says why."""


async def add_endpoint(
    store: WebhookStore,
    policy: TargetPolicy,
    account: uuid.UUID,
    url: str,
    events: str | None,
) -> WebhookEndpoint:
    """Store a new endpoint with a fresh signing secret (returned once, in the endpoint)."""
    try:
        url = check_url(url)
        chosen = parse_events(events)
        policy.check_url(url)
    except (ValueError, TargetRefusedError) as exc:
        raise EndpointError(str(exc)) from None
    return await store.add_webhook_endpoint(account, url, new_secret(), chosen)


async def list_endpoints(
    store: WebhookStore, account: uuid.UUID | None = None
) -> list[WebhookEndpoint]:
    return await store.list_webhook_endpoints(account)


async def remove_endpoint(store: WebhookStore, endpoint_id: uuid.UUID) -> bool:
    """True when it existed; its pending deliveries are then dropped, not sent."""
    return await store.remove_webhook_endpoint(endpoint_id)
