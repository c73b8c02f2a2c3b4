"""Lead facts from an OpenAI (or OpenAI-compatible) Chat Completions model.

Retries are ours, not the client's: rate limits, 5xx, timeouts and connection errors are
retried with capped, jittered exponential backoff that honours `Retry-After`, at most
`OPENAI_MAX_RETRIES` times, then `AnalyzerUnavailableError` hands the contact back to the
consumer's own delayed retry. A bad key or unknown model is `AnalyzerConfigError` at once.
An answer that is not valid facts (bad JSON, schema violation, refusal, cut at the token
limit) is asked for once more, then the rules extractor supplies the facts
("rules-fallback").

Every call is bounded: the answer by `OPENAI_MAX_COMPLETION_TOKENS` (sent as the parameter
the server honours), each call by `OPENAI_TIMEOUT`, and the whole analysis, retries
included, by `OPENAI_ANALYSIS_TIMEOUT`; past that the analysis is cancelled and fails as
`AnalyzerUnavailableError` (the consumer retries later, then dead-letters). A parameter or
response format the server refuses is dropped once and remembered (`RequestShape`).
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import re
import time
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
from loguru import logger
from openai import APIConnectionError, APIStatusError, APITimeoutError, AsyncOpenAI
from openai.types.chat import ChatCompletion

from service.adapters.analyzers.base import (
    AnalysisResult,
    AnalyzerConfigError,
    AnalyzerUnavailableError,
    TokenUsage,
)
from service.adapters.analyzers.cited import decode_loose, read_evidence, split_answer
from service.adapters.analyzers.prompt import Prompt, build_prompt
from service.adapters.analyzers.request_shape import RequestShape
from service.config import Settings
from service.domain.dialog import Dialog
from service.domain.evidence import FactEvidence
from service.domain.facts import LeadFacts
from service.logs import contact_hash, contact_hash_key, keyed_contact_hash

if TYPE_CHECKING:
    from collections.abc import Mapping

    from loguru import Logger

DEFAULT_BASE_URL = "https://api.openai.com/v1"
PROPS_TIMEOUT = 5.0
# Answers worth another try: request timeout, conflict, rate limit; 5xx are added below.
_RETRY_STATUS = frozenset({408, 409, 429})
# Request-specific rejections: this dialog cannot be analysed by the model, others can.
_DIALOG_REJECTED = frozenset(
    {"context_length_exceeded", "invalid_prompt", "string_above_max_length"}
)
_ERROR_PATH = re.compile(r"at `(\$[^`]*)`")


class FactsExtractor(Protocol):
    """Synchronous facts extraction without a model (the rules analyzer)."""

    def extract(self, dialog: Dialog) -> LeadFacts: ...

    def explain(self, dialog: Dialog) -> tuple[LeadFacts, FactEvidence]: ...


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """Backoff between retried calls (the number of retries is OPENAI_MAX_RETRIES)."""

    base: float = 0.5  # first backoff, seconds; doubles per retry
    cap: float = 20.0  # longest backoff
    # Longest wait a server's Retry-After may ask for: beyond it the analysis gives up
    # now, and the consumer retries later instead of holding a slot.
    max_wait: float = 60.0

    def backoff(self, retry: int, rng: random.Random) -> float:
        """Wait before retry number `retry` (0-based): half fixed, half random."""
        ceiling = min(self.cap, self.base * 2.0**retry)
        return ceiling / 2 + rng.uniform(0, ceiling / 2)


class _Transient(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _UnusableAnswer(Exception):
    """The model answered, but not with valid facts."""


class _DialogRejected(Exception):
    """The API refused this particular dialog (too long, flagged)."""


class OpenAIAnalyzer:
    name = "openai"

    def __init__(
        self,
        settings: Settings,
        fallback: FactsExtractor,
        *,
        retry: RetryPolicy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not settings.openai_api_key:
            raise AnalyzerConfigError("OPENAI_API_KEY is not set: the OpenAI analyzer needs it")
        self._settings = settings
        # Keyed like the logs' contact hash: the provider sees no phone number.
        self._cache_key_secret = contact_hash_key(settings)
        self._model = settings.openai_model
        self._fallback = fallback
        self._retry = retry or RetryPolicy()
        self._rng = rng or random.Random()
        self._max_retries = settings.openai_max_retries
        self._base_url = settings.openai_base_url or DEFAULT_BASE_URL
        system = settings.openai_system_message
        self._probe_lock = asyncio.Lock()
        self._shape = RequestShape(
            model=settings.openai_model,
            max_completion_tokens=settings.openai_max_completion_tokens,
            reasoning_effort=settings.openai_reasoning_effort,
            openai=is_openai(self._base_url),
            fold_system=None if system == "auto" else system == "user",
        )
        # The client's own retries are off (ours honour Retry-After and report
        # exhaustion as AnalyzerUnavailableError); its 600 s default timeout is replaced.
        self._client = AsyncOpenAI(
            api_key=settings.openai_api_key,
            base_url=self._base_url,
            timeout=settings.openai_timeout,
            max_retries=0,
        )

    @property
    def shape(self) -> RequestShape:
        return self._shape

    async def analyze(self, dialog: Dialog) -> AnalysisResult:
        log = logger.bind(instance=dialog.instance, contact_hash=contact_hash(dialog.contact.phone))
        usage = TokenUsage()
        limit = self._settings.openai_analysis_timeout
        try:
            async with asyncio.timeout(limit):
                return await self._analyze(dialog, usage, log)
        except TimeoutError:
            raise AnalyzerUnavailableError(
                f"analysis took longer than OPENAI_ANALYSIS_TIMEOUT ({limit:g} s)", usage
            ) from None
        except AnalyzerUnavailableError as exc:
            exc.usage = usage
            raise

    async def _analyze(self, dialog: Dialog, usage: TokenUsage, log: Logger) -> AnalysisResult:
        if self._shape.fold_system is None:
            async with self._probe_lock:  # one look at the server, not one per analysis
                if self._shape.fold_system is None:
                    self._shape.fold_system = await self._template_drops_system()
        # Per contact: the provider routes requests with the same key to the same cache.
        cache_key = f"crm-{keyed_contact_hash(self._cache_key_secret, dialog.contact.phone)}"
        model = self._model
        for attempt in (1, 2):
            try:
                completion, prompt = await self._complete(dialog, cache_key, usage, log)
            except _DialogRejected as exc:
                log.warning("OpenAI rejected this dialog ({}); using the rules facts", exc)
                break
            model = completion.model or model
            try:
                facts, raw_evidence = decode_answer(completion)
            except _UnusableAnswer as exc:
                log.warning("unusable OpenAI answer on attempt {}: {}", attempt, exc)
                continue
            # Numbers name lines of the prompt this answer was given; only those count.
            evidence, dropped = read_evidence(raw_evidence, facts, dialog, prompt.shown)
            if dropped:
                log.info("{} evidence numbers outside the dialog sent were dropped", dropped)
            return AnalysisResult(
                facts=facts,
                analyzer="openai",
                model=model,
                usage=usage,
                evidence=evidence,
                evidence_dropped=dropped,
            )
        else:
            log.warning("OpenAI answer unusable twice; using the rules facts")
        facts, evidence = self._fallback.explain(dialog)
        return AnalysisResult(
            facts=facts, analyzer="rules-fallback", model=model, usage=usage, evidence=evidence
        )

    async def close(self) -> None:
        await self._client.close()

    async def _template_drops_system(self) -> bool:
        """Whether the server's chat template drops system messages (asked once).

        llama.cpp's server tells in `GET /props` (`chat_template_caps.supports_system_role`);
        other servers keep the system role unless OPENAI_SYSTEM_MESSAGE=user says otherwise.
        """
        if self._shape.openai:
            return False
        root = re.sub(r"/v1/?$", "", self._base_url.rstrip("/"))
        try:
            props = await self._client.get(
                f"{root}/props", cast_to=object, options={"timeout": PROPS_TIMEOUT}
            )
        except Exception as exc:  # no such endpoint: not llama.cpp, keep the system role
            logger.debug("no llama.cpp /props ({}): system messages kept", type(exc).__name__)
            return False
        caps = props.get("chat_template_caps") if isinstance(props, dict) else None
        drops = isinstance(caps, dict) and caps.get("supports_system_role") is False
        if drops:
            logger.info(
                "the server's chat template drops system messages: the instructions go "
                "first in the user message"
            )
        return drops

    async def _complete(
        self, dialog: Dialog, cache_key: str, usage: TokenUsage, log: Logger
    ) -> tuple[ChatCompletion, Prompt]:
        """One completion and the prompt it answers, retried on transient failures; usage
        accumulates per call."""
        retry = 0
        while True:
            shape = self._shape
            prompt = build_prompt(
                dialog,
                self._settings,
                with_schema=shape.schema_in_prompt,
                fold_system=bool(shape.fold_system),
            )
            usage.calls += 1
            # Until the answer reports usage (cancelled calls never do).
            usage.calls_without_usage += 1
            try:
                # No `temperature`: reasoning models reject it, and extraction needs no
                # sampling tweaks beyond the schema.
                # `post` with a plain JSON body: the same request `chat.completions.create`
                # sends, without its per-call walk over the typed parameters (about 4 ms of
                # CPU for this deep schema, a third of a call's cost in the client).
                completion = await self._client.post(
                    "/chat/completions",
                    cast_to=ChatCompletion,
                    body=shape.body(prompt.messages(), cache_key),
                )
            except APIStatusError as exc:
                if shape.learn(exc.status_code, exc.message, _param(exc), exc.code):
                    continue  # the same request in a shape this server takes
                failure = self._classify(exc)
            except APITimeoutError:
                failure = _Transient(f"timed out after {self._settings.openai_timeout:g} s")
            except APIConnectionError as exc:
                failure = _Transient(f"connection error: {exc.__cause__ or exc}")
            else:
                add_usage(usage, completion)
                return completion, prompt

            if retry >= self._max_retries:
                raise AnalyzerUnavailableError(
                    f"OpenAI unavailable after {retry + 1} calls: {failure.reason}", usage
                )
            if failure.retry_after is not None:
                if failure.retry_after > self._retry.max_wait:
                    raise AnalyzerUnavailableError(
                        f"OpenAI asked to wait {failure.retry_after:.0f} s ({failure.reason})",
                        usage,
                    )
                delay = failure.retry_after
            else:
                delay = self._retry.backoff(retry, self._rng)
            retry += 1
            log.warning(
                "OpenAI call failed ({}); retry {}/{} in {:.2f} s",
                failure.reason,
                retry,
                self._max_retries,
                delay,
            )
            await asyncio.sleep(delay)

    def _classify(self, exc: APIStatusError) -> _Transient:
        """A transient failure to retry, or raise the permanent error it stands for."""
        status = exc.status_code
        code = exc.code or ""
        detail = _short(exc.message)
        if status in _RETRY_STATUS or status >= 500:
            if code == "insufficient_quota":
                # Billing, not load: waiting seconds will not help; the consumer's later
                # retry (or a dead-letter replay) will, once the quota is fixed.
                raise AnalyzerUnavailableError(f"OpenAI quota exhausted (HTTP {status}): {detail}")
            return _Transient(f"HTTP {status}", retry_after_seconds(exc.response.headers))
        if status in (401, 403):
            raise AnalyzerConfigError(
                f"OpenAI rejected the API key (HTTP {status}): check OPENAI_API_KEY ({detail})"
            )
        if code == "model_not_found" or (status == 404 and "model" in detail.lower()):
            raise AnalyzerConfigError(
                f"OpenAI model {self._model!r} was not found (HTTP {status}): set OPENAI_MODEL "
                f"to a model this API key can use ({detail})"
            )
        if status == 404:
            raise AnalyzerConfigError(
                f"HTTP 404 from {self._base_url}/chat/completions: check OPENAI_BASE_URL (it "
                f"usually ends in /v1) and OPENAI_MODEL ({self._model!r})"
            )
        if code in _DIALOG_REJECTED or status == 413:
            raise _DialogRejected(f"HTTP {status} {code}".strip())
        raise AnalyzerConfigError(
            f"OpenAI refused the request (HTTP {status}): {detail}; check that OPENAI_MODEL "
            f"({self._model!r}) supports Structured Outputs"
        )


def is_openai(base_url: str) -> bool:
    return base_url.rstrip("/").startswith("https://api.openai.com")


def _param(exc: APIStatusError) -> str | None:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("param"), str):
            return str(inner["param"])
    return None


def decode_answer(completion: ChatCompletion) -> tuple[LeadFacts, Any]:
    """The facts in the completion's first choice and its evidence as given (unchecked),
    or `_UnusableAnswer` saying why not."""
    if not completion.choices:
        raise _UnusableAnswer("no choices")
    choice = completion.choices[0]
    if choice.message.refusal:
        raise _UnusableAnswer("refusal")
    if choice.finish_reason == "length":
        raise _UnusableAnswer("answer cut at the token limit")
    if choice.finish_reason == "content_filter":
        raise _UnusableAnswer("content filter")
    content = choice.message.content
    if not content:
        raise _UnusableAnswer("empty answer")
    try:
        return split_answer(decode_loose(content))
    except msgspec.ValidationError as exc:
        # The path only: values may quote the dialog.
        logger.debug("schema violation in OpenAI answer: {}", exc)
        where = _ERROR_PATH.search(str(exc))
        raise _UnusableAnswer(f"schema violation at {where.group(1) if where else '$'}") from None
    except msgspec.DecodeError:
        raise _UnusableAnswer("invalid JSON") from None


def add_usage(usage: TokenUsage, completion: ChatCompletion) -> None:
    reported = completion.usage
    if reported is None:
        return
    usage.calls_without_usage = max(0, usage.calls_without_usage - 1)
    usage.prompt_tokens += reported.prompt_tokens or 0
    usage.completion_tokens += reported.completion_tokens or 0
    details = reported.prompt_tokens_details
    if details is not None and details.cached_tokens:
        usage.cached_tokens += details.cached_tokens


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asked to wait (`retry-after-ms`, then `Retry-After`), if any."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
