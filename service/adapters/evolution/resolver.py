"""Whose message is it: the contact of an event that carries no phone number.

Two kinds of events name no phone: a LID-addressed message without `remoteJidAlt` /
`senderPn` (and the business's replies from its phone in such a chat), and an edit or
delete whose key names the business instead of the contact (an edit's protocolMessage is
keyed from the sender's side). They are resolved through what was seen before: LID↔phone
pairs and message ids of earlier events (remembered here, bounded), LID↔phone pairs any
consumer process saw (the results database, `crm_lid_pairs`), else Evolution's own
database (messages that carried both, the stored message with that id).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

from loguru import logger

from service.adapters.broker.envelope import QueuedEvent

_MEMORY = 100_000  # pairs and message ids remembered (oldest forgotten first)


class IdentitySource(Protocol):
    async def phone_for_lid(self, instance: str, lid: str) -> str | None: ...

    async def contact_of_message(self, instance: str, message_id: str) -> str | None: ...


class PairStore(Protocol):
    async def remember_lid(self, instance: str, lid: str, phone_jid: str) -> bool: ...

    async def lid_phone(self, instance: str, lid: str) -> str | None: ...


class ContactResolver:
    def __init__(
        self,
        source: IdentitySource | None,
        memory: int = _MEMORY,
        pairs: PairStore | None = None,
    ) -> None:
        self._source = source
        self._pairs = pairs
        self._memory = memory
        self._lid_phones: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._message_phones: OrderedDict[tuple[str, str], str] = OrderedDict()

    async def remember(self, event: QueuedEvent) -> None:
        """Learn from an event that names its contact (a new LID pair is also stored for
        the other consumer processes)."""
        if event.phone_jid is None:
            return
        if event.lid is not None:
            key = (event.instance, event.lid)
            new = self._lid_phones.get(key) != event.phone_jid
            self._put(self._lid_phones, key, event.phone_jid)
            if new and self._pairs is not None:
                try:
                    await self._pairs.remember_lid(event.instance, event.lid, event.phone_jid)
                except Exception as exc:  # only the other processes' lookups are delayed
                    logger.debug("storing a LID pair failed: {}", exc)
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
        if phone is None and event.lid is not None and self._pairs is not None:
            try:
                phone = await self._pairs.lid_phone(event.instance, event.lid)
            except Exception as exc:  # the store being away only delays the event
                logger.debug("LID lookup failed: {}", exc)
        if phone is not None or self._source is None:
            if phone is not None and event.lid is not None:
                self._put(self._lid_phones, (event.instance, event.lid), phone)
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
