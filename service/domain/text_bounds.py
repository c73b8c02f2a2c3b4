"""The most text an analyzer is given: per message and per dialog (newest kept).

A WhatsApp message can be 65,536 characters and an API client can send more; analysis
cost grows with the text, so the pipeline cuts every dialog to these bounds before any
analyzer sees it. Pure.
"""

from __future__ import annotations

import msgspec

from service.domain.dialog import Dialog, DialogMessage


def bounded_dialog(dialog: Dialog, *, message_chars: int, dialog_chars: int) -> Dialog:
    """`dialog` with each text cut to `message_chars` and the oldest messages left out
    beyond `dialog_chars` in all (the newest message is always kept, cut)."""
    kept: list[DialogMessage] = []
    total = 0
    changed = False
    for message in reversed(dialog.messages):
        text = message.text
        if len(text) > message_chars:
            text = text[:message_chars]
            changed = True
        if kept and total + len(text) > dialog_chars:
            changed = True
            break
        total += len(text)
        kept.append(
            message if text is message.text else msgspec.structs.replace(message, text=text)
        )
    if not changed:
        return dialog
    kept.reverse()
    return msgspec.structs.replace(dialog, messages=kept)
