"""Outbound webhooks: Standard Webhooks signatures, target policy, HTTP delivery."""
