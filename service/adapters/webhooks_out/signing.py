"""Standard Webhooks signatures (HMAC-SHA256, `v1`), as the specification defines them.

The signed content is `<webhook-id>.<webhook-timestamp>.<body>`, the key the base64-decoded
part of the `whsec_…` secret, the header value `v1,<base64 of the MAC>`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

from service.domain.webhooks import SECRET_PREFIX

SECRET_BYTES = 32  # the specification asks for 24 to 64 random bytes


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The key bytes of a `whsec_…` secret; ValueError when it is not one."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("a signing secret starts with whsec_")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a signing secret is whsec_ followed by base64") from None
    if not key:
        raise ValueError("empty signing secret")
    return key


def signature(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value."""
    content = f"{webhook_id}.{timestamp}.".encode() + body
    mac = hmac.new(key, content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()
