"""Labeled sample dialogs as domain `Dialog` objects, for tests and benchmarks.

The JSON shape is the one of `service/demo_data/dialogs.json`: `id`, `contact` (`phone`,
`push_name`), `messages` (`from_me`, `text`, `ts`) and `labels`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from service.domain.dialog import Contact, Dialog, DialogMessage

ROOT = Path(__file__).parent.parent
DEV_DIALOGS = ROOT / "service" / "demo_data" / "dialogs.json"
HOLDOUT_DIALOGS = Path(__file__).parent / "data" / "holdout_dialogs.json"


def load_items(path: Path) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))
    return items


def to_dialog(item: dict[str, Any], instance: str = "dev") -> Dialog:
    """A labeled item as the Dialog an analyzer receives (message ids `<item id>-<n>`)."""
    phone = str(item["contact"]["phone"])
    messages = [
        DialogMessage(
            id=f"{item['id']}-{n}",
            from_me=bool(m["from_me"]),
            timestamp=datetime.fromisoformat(m["ts"].replace("Z", "+00:00")),
            text=m["text"],
            type="conversation",
        )
        for n, m in enumerate(item["messages"])
    ]
    return Dialog(
        instance=instance,
        contact=Contact(
            phone=phone,
            remote_jid=f"{phone}@s.whatsapp.net",
            name=item["contact"].get("push_name") or None,
        ),
        messages=messages,
        incoming_count=sum(1 for m in messages if not m.from_me),
        outgoing_count=sum(1 for m in messages if m.from_me),
        first_message_at=messages[0].timestamp if messages else None,
        last_message_at=messages[-1].timestamp if messages else None,
    )


def dialog_of(turns: Sequence[tuple[str, str]], phone: str = "77010000000") -> Dialog:
    """A dialog from ("C" | "M", text) turns: C = the client, M = the manager."""
    start = datetime(2026, 9, 1, 9, 0, tzinfo=UTC)
    item = {
        "id": "t",
        "contact": {"phone": phone, "push_name": "Test"},
        "messages": [
            {
                "from_me": who == "M",
                "text": text,
                "ts": (start + timedelta(minutes=5 * n)).isoformat(),
            }
            for n, (who, text) in enumerate(turns)
        ],
    }
    return to_dialog(item, instance="test")
