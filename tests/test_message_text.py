"""Readable text of every Evolution message kind, and tolerance of odd stored shapes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.adapters.evolution.message_text import SKIPPED_TYPES, message_text

WEBHOOKS = Path(__file__).parent / "data" / "webhooks"

# Binary fields and 64-bit numbers as Evolution stores them (Buffer / Long objects).
BUFFER = {"0": 12, "1": 200, "2": 7}
LONG = {"low": 183244, "high": 0, "unsigned": True}

CASES: list[tuple[str, str, dict[str, Any], str | None]] = [
    ("plain text", "conversation", {"conversation": "Здравствуйте!"}, "Здравствуйте!"),
    (
        "extended text (as sent by some clients)",
        "extendedTextMessage",
        {"extendedTextMessage": {"text": "see https://example.com", "matchedText": "x"}},
        "see https://example.com",
    ),
    (
        "image with caption",
        "imageMessage",
        {"imageMessage": {"caption": "прайс", "mediaKey": BUFFER, "fileLength": LONG}},
        "[image] прайс",
    ),
    (
        "image without caption",
        "imageMessage",
        {"imageMessage": {"mimetype": "image/jpeg"}},
        "[image]",
    ),
    ("video with caption", "videoMessage", {"videoMessage": {"caption": "tour"}}, "[video] tour"),
    (
        "document with file name and caption",
        "documentMessage",
        {
            "documentMessage": {
                "fileName": "offer.pdf",
                "caption": "our offer",
                "fileSha256": BUFFER,
            }
        },
        "[document] offer.pdf our offer",
    ),
    (
        "document wrapped with caption",
        "documentWithCaptionMessage",
        {
            "documentWithCaptionMessage": {
                "message": {"documentMessage": {"fileName": "kp.docx", "caption": "КП"}}
            }
        },
        "[document] kp.docx КП",
    ),
    (
        "voice note transcribed by speech-to-text",
        "audioMessage",
        {"audioMessage": {"seconds": 14, "ptt": True}, "speechToText": "[audio] Да, я владелец"},
        "[audio] Да, я владелец",
    ),
    (
        "transcription without the prefix",
        "audioMessage",
        {"audioMessage": {"seconds": 3}, "speechToText": "перезвоните"},
        "[audio] перезвоните",
    ),
    ("audio without text", "audioMessage", {"audioMessage": {"seconds": LONG}}, "[audio]"),
    ("sticker", "stickerMessage", {"stickerMessage": {"fileSha256": BUFFER}}, "[sticker]"),
    (
        "location with a name",
        "locationMessage",
        {"locationMessage": {"degreesLatitude": 43.2, "name": "Clinic", "address": "Abaya 1"}},
        "[location] Clinic Abaya 1",
    ),
    (
        "location without a name",
        "locationMessage",
        {"locationMessage": {"degreesLatitude": 1}},
        "[location]",
    ),
    (
        "contact card",
        "contactMessage",
        {"contactMessage": {"displayName": "Ержан", "vcard": "BEGIN:VCARD"}},
        "[contact] Ержан",
    ),
    (
        "several contact cards",
        "contactsArrayMessage",
        {
            "contactsArrayMessage": {
                "contacts": [{"displayName": "Anna"}, {"displayName": "Boris"}, "junk"]
            }
        },
        "[contacts] Anna, Boris",
    ),
    (
        "poll",
        "pollCreationMessageV3",
        {
            "pollCreationMessageV3": {
                "name": "Budget?",
                "options": [{"optionName": "<100k"}, {"optionName": ">100k"}],
            }
        },
        "[poll] Budget? (<100k / >100k)",
    ),
    (
        "buttons reply",
        "buttonsResponseMessage",
        {"buttonsResponseMessage": {"selectedDisplayText": "Да, интересно"}},
        "Да, интересно",
    ),
    (
        "list reply",
        "listResponseMessage",
        {
            "listResponseMessage": {
                "title": "Consultation",
                "singleSelectReply": {"selectedRowId": "r1"},
            }
        },
        "Consultation",
    ),
    (
        "list reply with only a row id",
        "listResponseMessage",
        {"listResponseMessage": {"singleSelectReply": {"selectedRowId": "row-7"}}},
        "row-7",
    ),
    (
        "ephemeral wrapper",
        "ephemeralMessage",
        {"ephemeralMessage": {"message": {"conversation": "disappearing"}}},
        "disappearing",
    ),
    ("unknown kind", "someFutureMessage", {"someFutureMessage": {}}, "[message]"),
    (
        "protocol message (delete / edit)",
        "protocolMessage",
        {"protocolMessage": {"type": 0, "key": {"id": "X"}}},
        None,
    ),
    ("reaction", "reactionMessage", {"reactionMessage": {"text": "👍", "key": {"id": "X"}}}, None),
    ("protocol message without a type", "", {"protocolMessage": {"type": 14}}, None),
]


@pytest.mark.parametrize(
    ("message_type", "message", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_every_message_kind_has_readable_text(
    message_type: str, message: dict[str, Any], expected: str | None
) -> None:
    assert message_text(message, message_type) == expected


def test_webhook_examples_read_as_expected() -> None:
    texts = {}
    for path in sorted(WEBHOOKS.glob("messages-upsert-*.json")):
        data = json.loads(path.read_text())["data"]
        texts[path.stem] = message_text(data["message"], data["messageType"])
    assert texts["messages-upsert-audio-transcribed"] == (
        "[audio] Да, я владелец, давайте созвонимся в четверг в 11"
    )
    assert texts["messages-upsert-image-caption"] == (
        "[image] Вот наш прайс на имплантацию, бюджет на рекламу около 200 тыс в месяц"
    )
    incoming = texts["messages-upsert-text-incoming"]
    assert incoming is not None and incoming.startswith("Здравствуйте! Увидела")


@pytest.mark.parametrize("kind", sorted(SKIPPED_TYPES))
def test_skipped_types_are_not_dialog_turns(kind: str) -> None:
    assert message_text({kind: {"text": "x"}, "conversation": "hidden"}, kind) is None


@pytest.mark.parametrize(
    "message",
    [None, "text", 42, [], ["a"], {"conversation": 5}, {"imageMessage": "base64"}],
    ids=repr,
)
def test_odd_stored_shapes_give_a_placeholder_not_an_error(message: Any) -> None:
    text = message_text(message, "imageMessage")
    assert isinstance(text, str) and text


def test_lists_stored_as_other_values_are_ignored() -> None:
    odd_contacts = {"contactsArrayMessage": {"contacts": True, "displayName": "2 contacts"}}
    assert message_text(odd_contacts, "contactsArrayMessage") == "[contacts] 2 contacts"
    odd_poll = {"pollCreationMessage": {"name": "Budget?", "options": 5}}
    assert message_text(odd_poll, "pollCreationMessage") == "[poll] Budget?"


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "conversation",
                    "imageMessage",
                    "caption",
                    "documentMessage",
                    "fileName",
                    "contactsArrayMessage",
                    "contacts",
                    "displayName",
                    "pollCreationMessage",
                    "options",
                    "optionName",
                    "ephemeralMessage",
                    "message",
                    "locationMessage",
                    "speechToText",
                    "listResponseMessage",
                    "singleSelectReply",
                ]
            ),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(message=_json, message_type=st.sampled_from(["conversation", "imageMessage", "", "x"]))
def test_never_fails_on_arbitrary_json(message: Any, message_type: str) -> None:
    text = message_text(message, message_type)
    assert text is None or (isinstance(text, str) and text.strip() == text and text)
