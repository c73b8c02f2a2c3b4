"""What one Chat Completions request carries, and what the server has shown it refuses.

OpenAI-compatible servers differ: OpenAI's reasoning models refuse `max_tokens` and take
`max_completion_tokens`; llama-cpp-python's server honours only `max_tokens`; llama.cpp's
own server reads both; strict `json_schema` answers may be unsupported (llama-cpp-python
takes only `text` / `json_object` with a `schema`); some chat templates drop the system
role. A refusal is learned once and kept for the life of the analyzer, so no call is ever
retried with the same rejected shape.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from loguru import logger

from service.adapters.analyzers.schema import SCHEMA_NAME, lead_facts_schema

# Parameters a request can do without; each is dropped the first time a server names it
# in a refusal.
OPTIONAL_PARAMS = ("reasoning_effort", "prompt_cache_key", "max_tokens", "max_completion_tokens")
# From strict to none: the facts are still validated by the decoder on every answer.
Format = Literal["json_schema", "json_object", "prompt_only"]
FORMATS: tuple[Format, ...] = ("json_schema", "json_object", "prompt_only")

REASONING_MODEL = re.compile(r"^(gpt-5|gpt-6|o\d)")
_QUOTED = re.compile(r"['\"`]([a-z_]+)['\"`]")


class RequestShape:
    """Builds request bodies and narrows them as the server refuses parts of them."""

    def __init__(
        self,
        *,
        model: str,
        max_completion_tokens: int,
        reasoning_effort: str,
        openai: bool,
        fold_system: bool | None,
    ) -> None:
        self._model = model
        self._max_tokens = max_completion_tokens
        self._reasoning_effort = reasoning_effort
        self.openai = openai
        # None: not known yet (asked once from the server, where it can tell).
        self.fold_system = fold_system
        self.dropped: set[str] = set()  # not sent
        self.refused: set[str] = set()  # named in a refusal: never sent again
        self.format: Format = "json_schema"
        # Built once: the schema is a deep dict, and bodies are only ever serialised.
        schema = lead_facts_schema()
        self._response_formats: dict[Format, dict[str, Any]] = {
            "json_schema": {
                "type": "json_schema",
                "json_schema": {"name": SCHEMA_NAME, "strict": True, "schema": schema},
            },
            # llama.cpp and llama-cpp-python constrain the answer to `schema` here.
            "json_object": {"type": "json_object", "schema": schema},
        }
        if not reasoning_effort:
            self.dropped.add("reasoning_effort")
        if openai or REASONING_MODEL.match(model):
            # OpenAI's reasoning models answer 400 to `max_tokens`; other servers get both
            # names, as some honour only `max_tokens` and ignore the other.
            self.dropped.add("max_tokens")

    @property
    def schema_in_prompt(self) -> bool:
        """The schema text joins the instructions unless the server enforces it strictly
        (a `json_object` grammar constrains the form but shows the model no field meaning)."""
        return self.format != "json_schema"

    def body(self, messages: list[dict[str, str]], cache_key: str) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self._model, "messages": messages}
        if self.format in self._response_formats:
            body["response_format"] = self._response_formats[self.format]
        optional: dict[str, Any] = {
            "max_completion_tokens": self._max_tokens,
            "max_tokens": self._max_tokens,
            "reasoning_effort": self._reasoning_effort,
            "prompt_cache_key": cache_key,
        }
        for name, value in optional.items():
            if name not in self.dropped:
                body[name] = value
        return body

    def learn(self, status: int, message: str, param: str | None, code: str | None) -> bool:
        """Narrow the shape after a refusal; True when the request is worth sending again
        in its new shape (at once: this is not an outage)."""
        text = message.lower()
        named = self._refused_param(status, text, param, code)
        if named is not None:
            self.refused.add(named)
            self.dropped.add(named)
            # The limit must still be sent, under the other name, unless refused too.
            other = {"max_tokens": "max_completion_tokens", "max_completion_tokens": "max_tokens"}
            if named in other and other[named] not in self.refused:
                self.dropped.discard(other[named])
            logger.warning(
                "the model server refused the parameter {!r} (HTTP {}); it is no longer sent",
                named,
                status,
            )
            return True
        if self._format_refused(status, text, param):
            position = FORMATS.index(self.format)
            if position + 1 >= len(FORMATS):
                return False
            self.format = FORMATS[position + 1]
            logger.warning(
                "the model server refused the response format (HTTP {}); using {} from now on",
                status,
                self.format,
            )
            return True
        return False

    def _refused_param(
        self, status: int, text: str, param: str | None, code: str | None
    ) -> str | None:
        if status not in (400, 422):
            return None
        candidates = [p for p in OPTIONAL_PARAMS if p not in self.dropped | self.refused]
        if param is not None and param in candidates:
            return str(param)
        refusal = code in {"unsupported_parameter", "unknown_parameter"} or any(
            word in text
            for word in ("unsupported parameter", "unrecognized", "unknown", "not supported")
        )
        if not refusal:
            return None
        quoted = [name for name in _QUOTED.findall(text) if name in candidates]
        if quoted:
            return str(quoted[0])
        mentioned = [name for name in candidates if name in text]
        # "max_tokens" is inside "max_completion_tokens": prefer the longer name.
        return max(mentioned, key=len) if mentioned else None

    def _format_refused(self, status: int, text: str, param: str | None) -> bool:
        if status not in (400, 422, 500, 501) or self.format == "prompt_only":
            return False
        if param == "response_format":
            return True
        return "response_format" in text or "json_schema" in text
