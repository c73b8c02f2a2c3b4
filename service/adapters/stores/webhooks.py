"""What outbound webhooks need of the results store (both stores implement it).

Every call runs one SQL function of service/sql/0007_webhook_endpoints.sql, so the two
stores share the rules: endpoints scoped to their account, a delivery accepted once.
"""

from __future__ import annotations

import uuid
from typing import Protocol, runtime_checkable

from service.domain.webhooks import Claim, WebhookEndpoint


@runtime_checkable
class WebhookStore(Protocol):
    async def add_webhook_endpoint(
        self, account: uuid.UUID, url: str, secret: str, events: list[str] | None
    ) -> WebhookEndpoint: ...

    async def list_webhook_endpoints(self, account: uuid.UUID | None) -> list[WebhookEndpoint]: ...

    async def remove_webhook_endpoint(self, endpoint_id: uuid.UUID) -> bool: ...

    async def webhook_endpoints_for(
        self, account: uuid.UUID, event_type: str
    ) -> list[WebhookEndpoint]: ...

    async def claim_webhook_delivery(
        self,
        webhook_id: str,
        account: uuid.UUID,
        endpoint_id: uuid.UUID,
        token: uuid.UUID,
        lease_seconds: float,
    ) -> Claim: ...

    async def finish_webhook_delivery(
        self,
        webhook_id: str,
        account: uuid.UUID,
        token: uuid.UUID,
        accepted: bool,
        status: int | None,
    ) -> bool: ...


def webhook_store(store: object) -> WebhookStore:
    """The results store as a WebhookStore (both real stores are one)."""
    if not isinstance(store, WebhookStore):
        raise TypeError(f"{type(store).__name__} keeps no webhook endpoints")
    return store
