"""An OpenAI-compatible Chat Completions server over real HTTP, scriptable per test.

    async with FakeOpenAI(latency=0.2) as fake:
        settings = replace(settings, openai_base_url=fake.base_url)
        fake.script([FakeReply.error(429, headers={"Retry-After": "1"}), FakeReply()])
        ...
        assert fake.calls == 2 and fake.max_concurrency <= 8

Replies come from, in order: the scripted queue, the handler set by `set_handler`, and by
default a valid answer as strict mode returns it: the rules extractor's facts for the
dialog in the prompt, with `evidence` as the numbers (`#N`) of the prompt's messages the
rules cite, and a usage block. `facts=lambda dialog: FIXED` answers fixed facts instead
(no rules CPU in a benchmark; evidence empty); `evidence=lambda dialog: {...}` answers
those numbers instead (any values, invalid ones included).

Like OpenAI it answers 401 to a wrong key (when `api_key` is set), 404 `model_not_found`
to a model outside `known_models` (when set), and for its reasoning models (gpt-5*,
gpt-6*, o*) 400 `unsupported_parameter` to `max_tokens` and 400 to `temperature`, with
OpenAI's wording. `GET /v1/models/{id}` answers the model object, with `shutdown_date`
for the models in `shutdown_dates` (`models_endpoint=False`: 404, as servers without it).

Prompt caching as OpenAI documents it: the longest common prefix of a request's prompt
with the previous request of the same `prompt_cache_key` (or with the previous request at
all, whichever is longer) is served from cache once it reaches 1,024 tokens, in steps of
128 tokens; `prefix_tokens` records the exact common prefix for benchmarks.

Other servers' refusals are opt-in: `response_formats={"text", "json_object"}` refuses
every other `response_format` type with HTTP 500 as llama-cpp-python's server does
(`llama_cpp/server`: the request model's `response_format.type` is `text` or
`json_object`), `reject_params={"reasoning_effort"}` refuses those parameters with
OpenAI's 400, and `drops_system=True` answers as a model that never saw the system
message (llama-cpp-python's `format_gemma` drops it): `seen_prompt` records what the
model got; `props={...}` serves llama.cpp's `GET /props` (its `chat_template_caps`).
Every request is recorded with its JSON body, headers and start/finish times.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import math
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Hashable, Iterable
from datetime import UTC, datetime
from typing import Any

import msgspec
from aiohttp import web

from service.adapters.analyzers.prompt import CONTINUATION, DIALOG_CLOSE, DIALOG_OPEN, MANAGER_LABEL
from service.adapters.analyzers.rules import RulesAnalyzer
from service.domain.dialog import Contact, Dialog, DialogMessage
from service.domain.evidence import EVIDENCE_FACTS
from service.domain.facts import LeadFacts

CHARS_PER_TOKEN = 3.5
CACHE_MIN_TOKENS = 1024
CACHE_STEP_TOKENS = 128
_REASONING_MODEL = re.compile(r"^(gpt-5|gpt-6|o\d)")
_LINE = re.compile(r"^#(\d+) \[(\d{4}-\d\d-\d\d \d\d:\d\d)\] (\S+): ?(.*)$")
# The evidence of an answer without any: what strict mode returns when no message shows
# a fact.
NO_EVIDENCE: dict[str, list[Any]] = {fact: [] for fact in EVIDENCE_FACTS}


class RecordedRequest(msgspec.Struct, kw_only=True):
    """One request as the server saw it."""

    body: dict[str, Any]
    headers: dict[str, str]  # names in lower case
    started: float  # time.monotonic()
    finished: float | None = None
    prompt_tokens: int = 0  # the prompt as billed
    prefix_tokens: int = 0  # common prefix with the previous request of the same key
    seen_prompt: str = ""  # what the model got (system dropped when `drops_system`)

    @property
    def model(self) -> str | None:
        model = self.body.get("model")
        return model if isinstance(model, str) else None

    @property
    def messages(self) -> list[dict[str, Any]]:
        messages = self.body.get("messages")
        return messages if isinstance(messages, list) else []

    def content_of(self, role: str) -> str:
        return "\n".join(str(m.get("content", "")) for m in self.messages if m.get("role") == role)

    @property
    def system_prompt(self) -> str:
        return self.content_of("system")

    @property
    def user_prompt(self) -> str:
        return self.content_of("user")


class FakeReply(msgspec.Struct, kw_only=True):
    """What to answer one request with. Without `body`, a chat completion is built."""

    status: int = 200
    headers: dict[str, str] = {}
    body: Any = None  # raw answer: dict/list → JSON, str/bytes → as is
    content: str | None = None  # the assistant's content (None: facts for the dialog)
    refusal: str | None = None
    finish_reason: str = "stop"
    delay: float = 0.0  # seconds on top of the server's latency

    @classmethod
    def error(
        cls,
        status: int,
        message: str = "fake error",
        *,
        code: str | None = None,
        type: str = "server_error",  # OpenAI's field name
        headers: dict[str, str] | None = None,
        delay: float = 0.0,
    ) -> FakeReply:
        body = {"error": {"message": message, "type": type, "param": None, "code": code}}
        return cls(status=status, body=body, headers=headers or {}, delay=delay)

    @classmethod
    def answer(cls, content: str, *, finish_reason: str = "stop", delay: float = 0.0) -> FakeReply:
        return cls(content=content, finish_reason=finish_reason, delay=delay)

    @classmethod
    def facts(
        cls,
        facts: LeadFacts | dict[str, Any],
        *,
        evidence: dict[str, list[Any]] | None = None,
        delay: float = 0.0,
    ) -> FakeReply:
        """An answer of `facts` with `evidence` (message numbers; none by default), as a
        strict-schema answer carries both."""
        return cls(content=answer_json(facts, evidence), delay=delay)

    @classmethod
    def refused(cls, refusal: str = "I can't help with that.") -> FakeReply:
        return cls(refusal=refusal)


Handler = Callable[[RecordedRequest], "FakeReply | Awaitable[FakeReply]"]
FactsFor = Callable[[Dialog], LeadFacts]
EvidenceFor = Callable[[Dialog], dict[str, list[Any]]]


def answer_json(facts: LeadFacts | dict[str, Any], evidence: dict[str, Any] | None) -> str:
    """The answer's content: the facts' fields, then `evidence`."""
    fields = msgspec.to_builtins(facts)
    return msgspec.json.encode({**fields, "evidence": evidence or NO_EVIDENCE}).decode()


def rules_answer(rules: RulesAnalyzer, dialog: Dialog) -> str:
    """The rules' facts and their evidence as the numbers of the cited messages."""
    facts, cited = rules.explain(dialog)
    number = {m.id: int(m.id.rsplit("-", 1)[1]) for m in dialog.messages}
    evidence = {fact: [number[e.message_id] for e in cited.of(fact)] for fact in EVIDENCE_FACTS}
    return answer_json(facts, evidence)


class FakeOpenAI:
    def __init__(
        self,
        *,
        latency: float = 0.0,
        api_key: str | None = None,
        known_models: Collection[str] | None = None,
        facts: FactsFor | None = None,
        evidence: EvidenceFor | None = None,
        shutdown_dates: dict[str, str] | None = None,
        models_endpoint: bool = True,
        response_formats: Collection[str] | None = None,
        reject_params: Collection[str] = (),
        drops_system: bool = False,
        props: dict[str, Any] | None = None,
    ) -> None:
        self.latency = latency
        self.shutdown_dates = dict(shutdown_dates or {})
        self.models_endpoint = models_endpoint
        self.response_formats = set(response_formats) if response_formats is not None else None
        self.reject_params = set(reject_params)
        self.drops_system = drops_system
        self.props = props
        self.model_lookups: list[str] = []
        self._last_prompt: dict[str | None, str] = {}
        self.api_key = api_key
        self.known_models = set(known_models) if known_models is not None else None
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.max_concurrency = 0
        self._facts = facts
        self._evidence = evidence
        self._rules = RulesAnalyzer()
        self._script: deque[FakeReply] = deque()
        self._handler: Handler | None = None
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._port = 0

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_get("/v1/models/{model}", self._model)
        app.router.add_get("/props", self._props)
        # Cancel a handler when its client gives up (timeouts), and do not wait long for
        # sleeping handlers at shutdown.
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeOpenAI:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- scripting ------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}/v1"

    @property
    def calls(self) -> int:
        return len(self.requests)

    def script(self, replies: Iterable[FakeReply]) -> None:
        """Answer the next requests with these replies, in order, then as before."""
        self._script.extend(replies)

    def set_handler(self, handler: Handler | None) -> None:
        """Answer every unscripted request with `handler(request)` (None: default)."""
        self._handler = handler

    def reset(self) -> None:
        self.requests.clear()
        self._script.clear()
        self.max_concurrency = self.in_flight

    def max_concurrency_by(
        self, key: Callable[[RecordedRequest], Hashable | None]
    ) -> dict[Hashable, int]:
        """Most requests in flight at once per `key(request)` (None keys are ignored)."""
        events: dict[Hashable, list[tuple[float, int]]] = {}
        for request in self.requests:
            k = key(request)
            if k is None:
                continue
            end = request.finished if request.finished is not None else math.inf
            # At equal times a finish sorts before a start: back-to-back is not overlap.
            events.setdefault(k, []).extend([(request.started, 1), (end, -1)])
        result: dict[Hashable, int] = {}
        for k, points in events.items():
            current = peak = 0
            for _, step in sorted(points):
                current += step
                peak = max(peak, current)
            result[k] = peak
        return result

    # -- serving --------------------------------------------------------------------
    async def _props(self, request: web.Request) -> web.Response:
        # llama.cpp's server only (tools/server: GET /props with `chat_template_caps`).
        if self.props is None:
            raise web.HTTPNotFound()
        return web.json_response(self.props)

    async def _model(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        self.model_lookups.append(model)
        known = self.known_models is None or model in self.known_models
        if not self.models_endpoint or not known:
            reply = FakeReply.error(
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                code="model_not_found",
                type="invalid_request_error",
            )
            return web.json_response(reply.body, status=404)
        body: dict[str, Any] = {
            "id": model,
            "object": "model",
            "created": 1_760_000_000,
            "owned_by": "system",
        }
        if model in self.shutdown_dates:
            body["shutdown_date"] = self.shutdown_dates[model]
        return web.json_response(body)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            body = None
        record = RecordedRequest(
            body=body if isinstance(body, dict) else {"_raw": raw.decode(errors="replace")},
            headers={k.lower(): v for k, v in request.headers.items()},
            started=time.monotonic(),
        )
        self._account_prompt(record)
        self.requests.append(record)
        self.in_flight += 1
        self.max_concurrency = max(self.max_concurrency, self.in_flight)
        try:
            reply = await self._reply_for(record, body_ok=isinstance(body, dict))
            delay = self.latency + reply.delay
            if delay > 0:
                await asyncio.sleep(delay)
            return self._render(record, reply)
        finally:
            self.in_flight -= 1
            record.finished = time.monotonic()

    async def _reply_for(self, record: RecordedRequest, *, body_ok: bool) -> FakeReply:
        if not body_ok:
            return FakeReply.error(400, "body is not JSON", type="invalid_request_error")
        if self.api_key is not None:
            if record.headers.get("authorization") != f"Bearer {self.api_key}":
                return FakeReply.error(
                    401,
                    "Incorrect API key provided.",
                    code="invalid_api_key",
                    type="invalid_request_error",
                )
        model = record.model or ""
        if self.known_models is not None and model not in self.known_models:
            return FakeReply.error(
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                code="model_not_found",
                type="invalid_request_error",
            )
        reasoning = bool(_REASONING_MODEL.match(model))
        if "temperature" in record.body and reasoning:
            return FakeReply.error(
                400,
                "Unsupported value: 'temperature' does not support 0.0 with this model.",
                code="unsupported_value",
                type="invalid_request_error",
            )
        refused = {"max_tokens"} if reasoning else set()
        for param in sorted((refused | self.reject_params) & set(record.body)):
            if param == "max_tokens":
                message = (
                    "Unsupported parameter: 'max_tokens' is not supported with this model. "
                    "Use 'max_completion_tokens' instead."
                )
            else:
                message = f"Unrecognized request argument supplied: {param}"
            return _param_error(message, param)
        kind = (record.body.get("response_format") or {}).get("type", "text")
        if self.response_formats is not None and kind not in self.response_formats:
            return FakeReply.error(
                500,
                "1 validation error for CreateChatCompletionRequest\nresponse_format.type\n"
                f"  Input should be 'text' or 'json_object' [input_value='{kind}']",
            )
        if self._script:
            return self._script.popleft()
        if self._handler is not None:
            reply = self._handler(record)
            return await reply if inspect.isawaitable(reply) else reply
        return FakeReply()

    def _render(self, record: RecordedRequest, reply: FakeReply) -> web.Response:
        if reply.body is not None:
            if isinstance(reply.body, str | bytes):
                return web.Response(
                    status=reply.status,
                    body=reply.body.encode() if isinstance(reply.body, str) else reply.body,
                    headers=reply.headers,
                    content_type="application/json",
                )
            return web.Response(
                status=reply.status,
                body=msgspec.json.encode(reply.body),
                headers=reply.headers,
                content_type="application/json",
            )
        content = reply.content
        if content is None and reply.refusal is None:
            content = self._default_answer(record)
        completion = self._completion(record, content, reply)
        return web.Response(
            status=reply.status,
            body=msgspec.json.encode(completion),
            headers=reply.headers,
            content_type="application/json",
        )

    def _completion(
        self, record: RecordedRequest, content: str | None, reply: FakeReply
    ) -> dict[str, Any]:
        prompt_tokens = record.prompt_tokens
        cached = 0
        if record.prefix_tokens >= CACHE_MIN_TOKENS:
            cached = (
                record.prefix_tokens - (record.prefix_tokens - CACHE_MIN_TOKENS) % CACHE_STEP_TOKENS
            )
        completion_tokens = _tokens(content or reply.refusal or "")
        return {
            "id": f"chatcmpl-fake-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": record.model or "unknown",
            "system_fingerprint": "fp_fake",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": reply.refusal},
                    "finish_reason": reply.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0},
            },
        }

    def _account_prompt(self, record: RecordedRequest) -> None:
        """The prompt as one text (schema first, then each message), and its cached prefix."""
        schema = record.body.get("response_format")
        parts = [msgspec.json.encode(schema).decode() if schema is not None else ""]
        for message in record.messages:
            parts.append(f"<{message.get('role')}>{message.get('content', '')}")
        prompt = "\n".join(parts)
        key = record.body.get("prompt_cache_key")
        key = key if isinstance(key, str) else None
        common = max(
            _common_prefix(prompt, self._last_prompt.get(key, "")),
            _common_prefix(prompt, self._last_prompt.get("", "")),
        )
        self._last_prompt[key] = self._last_prompt[""] = prompt
        record.prompt_tokens = _tokens(prompt)
        record.prefix_tokens = int(common / CHARS_PER_TOKEN)
        seen = [m for m in record.messages if not (self.drops_system and m.get("role") == "system")]
        record.seen_prompt = "\n".join(str(m.get("content", "")) for m in seen)

    def _default_answer(self, record: RecordedRequest) -> str:
        dialog = parse_dialog(record.seen_prompt)
        if self._facts is None and self._evidence is None:
            return rules_answer(self._rules, dialog)
        facts = self._facts(dialog) if self._facts is not None else self._rules.extract(dialog)
        return answer_json(facts, self._evidence(dialog) if self._evidence else None)


def parse_dialog(user_prompt: str) -> Dialog:
    """The dialog back from the prompt's `<dialog>` block (continuations re-joined); each
    message's id is `fake-<its number in the prompt>`."""
    start = user_prompt.find(DIALOG_OPEN)
    end = user_prompt.rfind(DIALOG_CLOSE)
    block = user_prompt[start + len(DIALOG_OPEN) : end] if 0 <= start < end else ""
    parsed: list[tuple[int, datetime, bool, list[str]]] = []
    for line in block.split("\n"):
        if line.startswith(CONTINUATION) and parsed:
            parsed[-1][3].append(line[len(CONTINUATION) :])
            continue
        match = _LINE.match(line)
        if match:
            when = datetime.strptime(match.group(2), "%Y-%m-%d %H:%M").replace(tzinfo=UTC)
            number = int(match.group(1))
            parsed.append((number, when, match.group(3) == MANAGER_LABEL, [match.group(4)]))
    messages = [
        DialogMessage(
            id=f"fake-{number}",
            from_me=from_me,
            timestamp=when,
            text="\n".join(parts),
            type="conversation",
        )
        for number, when, from_me, parts in parsed
    ]
    return Dialog(
        instance="fake",
        contact=Contact(phone="0", remote_jid="0@s.whatsapp.net"),
        messages=messages,
        incoming_count=sum(1 for m in messages if not m.from_me),
        outgoing_count=sum(1 for m in messages if m.from_me),
        first_message_at=messages[0].timestamp if messages else None,
        last_message_at=messages[-1].timestamp if messages else None,
    )


def _param_error(message: str, param: str) -> FakeReply:
    body = {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": param,
            "code": "unsupported_parameter",
        }
    }
    return FakeReply(status=400, body=body)


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix of `a` and `b` (halving search over slices)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low


def _tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)
