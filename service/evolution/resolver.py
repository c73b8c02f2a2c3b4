"""Whose message is it: the contact of an event that carries no phone number.

Two kinds of events name no phone: a LID-addressed message without `remoteJidAlt` /
`senderPn` (and the business's replies from its phone in such a chat), and an edit or
delete whose key names the business instead of the contact (an edit's protocolMessage is
keyed from the sender's side). They are resolved through what was seen before: LID↔phone
pairs and message ids of earlier events (remembered here, bounded), else Evolution's own
database (messages that carried both, the stored message with that id).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

from loguru import logger

from service.broker.envelope import QueuedEvent

_MEMORY = 100_000  # pairs and message ids remembered (oldest forgotten first)


class IdentitySource(Protocol):
    async def phone_for_lid(self, instance: str, lid: str) -> str | None: ...

    async def contact_of_message(self, instance: str, message_id: str) -> str | None: ...


class ContactResolver:
    def __init__(self, source: IdentitySource | None, memory: int = _MEMORY) -> None:
        self._source = source
        self._memory = memory
        self._lid_phones: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._message_phones: OrderedDict[tuple[str, str], str] = OrderedDict()

    def remember(self, event: QueuedEvent) -> None:
        """Learn from an event that names its contact."""
        if event.phone_jid is None:
            return
        if event.lid is not None:
            self._put(self._lid_phones, (event.instance, event.lid), event.phone_jid)
        if event.change is None:
            self._put(self._message_phones, (event.instance, event.message_id), event.phone_jid)

    @staticmethod
    def resolvable(event: QueuedEvent) -> bool:
        """Whether the event could ever be resolved (a LID, or a change of a message)."""
        return event.lid is not None or event.change is not None

    async def resolve(self, event: QueuedEvent) -> str | None:
        """The contact's phone JID, or None while it is not known."""
        if event.lid is not None:
            phone = self._lid_phones.get((event.instance, event.lid))
        else:
            phone = self._message_phones.get((event.instance, event.message_id))
        if phone is not None or self._source is None:
            return phone
        try:
            if event.lid is not None:
                phone = await self._source.phone_for_lid(event.instance, event.lid)
            else:
                phone = await self._source.contact_of_message(event.instance, event.message_id)
        except Exception as exc:  # the database being away only delays the event
            logger.debug("contact lookup failed: {}", exc)
            return None
        if phone is not None:
            if event.lid is not None:
                self._put(self._lid_phones, (event.instance, event.lid), phone)
            else:
                self._put(self._message_phones, (event.instance, event.message_id), phone)
        return phone

    def _put(
        self, memory: OrderedDict[tuple[str, str], str], key: tuple[str, str], value: str
    ) -> None:
        memory[key] = value
        memory.move_to_end(key)
        if len(memory) > self._memory:
            memory.popitem(last=False)
