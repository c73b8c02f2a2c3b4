"""Prometheus metrics, kept in one registry object passed around explicitly (no globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.webhook_events = Counter(
            "crm_webhook_events",
            "Webhook calls by event and outcome (queued, ignored, rejected, unauthorized, "
            "unavailable, too_large)",
            ["event", "outcome"],
            registry=r,
        )
        self.analyses = Counter(
            "crm_analyses",
            "Contact analyses by outcome (analyzed, new_lead, unchanged, stale, error) "
            "and analyzer",
            ["outcome", "analyzer"],
            registry=r,
        )
        self.analysis_seconds = Histogram(
            "crm_analysis_duration_seconds",
            "Time to analyse one contact (read dialog, analyse, store)",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
            registry=r,
        )
        self.lead_score = Histogram(
            "crm_lead_score",
            "Scores of analysed leads",
            buckets=(0, 10, 20, 30, 40, 50, 60, 70, 75, 80, 90, 100),
            registry=r,
        )
        self.leads_by_interest = Counter(
            "crm_leads_scored",
            "Analysed leads by interest level",
            ["interest_level"],
            registry=r,
        )
        self.llm_tokens = Counter(
            "crm_llm_tokens",
            "LLM tokens by kind (prompt, cached, completion)",
            ["kind"],
            registry=r,
        )
        self.evidence_dropped = Counter(
            "crm_evidence_dropped",
            "Evidence an analyzer gave that was left out (an index outside the dialog sent, "
            "a message without text)",
            ["analyzer"],
            registry=r,
        )
        self.consumer_skips = Counter(
            "crm_consumer_skipped_events",
            "Events the consumer did not analyse, by reason",
            ["reason"],
            registry=r,
        )
        self.held_events = Counter(
            "crm_held_events",
            "Events whose contact was not known yet (kind: lid = LID-only message, "
            "unknown_message = edit/delete of a message not seen), by state: held (first "
            "held), resolved (merged into their contact later), dead_lettered",
            ["kind", "state"],
            registry=r,
        )
        self.retries = Counter(
            "crm_event_retries", "Events sent back for a delayed retry", registry=r
        )
        self.dead_lettered = Counter(
            "crm_events_dead_lettered",
            "Events sent to the dead-letter queue",
            ["reason"],
            registry=r,
        )
        self.dlq_depth = Gauge(
            "crm_dlq_depth", "Messages waiting in the dead-letter queue", registry=r
        )
        self.notify_fanout = Counter(
            "crm_notify_events",
            "Events read for outbound webhooks, by outcome (queued: deliveries made, "
            "no_endpoint, unknown_type, dead)",
            ["outcome"],
            registry=r,
        )
        self.notify_deliveries = Counter(
            "crm_notify_deliveries",
            "Outbound webhook deliveries by outcome: queued (made from an event), sent "
            "(2xx), failed (attempt failed, retry scheduled), dead (dead-lettered), "
            "deferred (endpoint busy or store down; no attempt made), duplicate (sent "
            "already), dropped (endpoint removed)",
            ["outcome"],
            registry=r,
        )
        self.notify_attempt_seconds = Histogram(
            "crm_notify_attempt_duration_seconds",
            "Time of one outbound webhook attempt (up to NOTIFY_TIMEOUT)",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=r,
        )
        self.lead_events = Counter(
            "crm_lead_events_published",
            "Lead events (lead.hot, lead.stage_changed) published from the outbox, by type",
            ["type"],
            registry=r,
        )
        self.outbox_depth = Gauge(
            "crm_outbox_depth",
            "Lead events stored but not published yet (read by consume processes)",
            registry=r,
        )
        self.llm_model_shutdown_days = Gauge(
            "crm_llm_model_shutdown_days",
            "Days until the configured model's announced shutdown (GET /v1/models/{id}); "
            "absent when none is announced, 0 or less once it is past",
            ["model"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
