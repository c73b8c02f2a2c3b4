"""Is the configured model about to be shut down? Read at start-up and then daily.

OpenAI's `GET /v1/models/{id}` carries an optional `shutdown_date` (YYYY-MM-DD). When the
configured model has one: a warning log line with the days left, the gauge
`crm_llm_model_shutdown_days`, and `/ready`'s `llm_model` check (a warning within
`WARN_DAYS`; on and past the date a failed check and one error line). Servers without
the endpoint or the field are fine: the check then says so and passes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import UTC, date, datetime

import msgspec
from loguru import logger
from openai import AsyncOpenAI, NotFoundError, OpenAIError

from service.config import Settings
from service.metrics import Metrics

WARN_DAYS = 30
CHECK_EVERY_SECONDS = 24 * 3600.0
LOOKUP_TIMEOUT = 10.0


class ModelStatus(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    shutdown_date: date | None = None
    days_left: int | None = None
    note: str = ""  # why nothing is known (no endpoint, lookup failed)

    @property
    def shut_down(self) -> bool:
        return self.days_left is not None and self.days_left <= 0

    def check(self) -> str:
        """The `/ready` line: "ok…" or "warning…" pass, "down…" fails."""
        if self.shutdown_date is None:
            return f"ok: {self.note}" if self.note else "ok"
        if self.shut_down:
            return (
                f"down: model {self.model} was shut down on {self.shutdown_date.isoformat()}; "
                "set OPENAI_MODEL to a current model"
            )
        if self.days_left is not None and self.days_left <= WARN_DAYS:
            return (
                f"warning: model {self.model} shuts down on {self.shutdown_date.isoformat()} "
                f"({self.days_left} days left); set OPENAI_MODEL to its replacement"
            )
        return f"ok: shutdown announced for {self.shutdown_date.isoformat()}"


class ModelLifecycle:
    """Looks the model up, keeps the latest status, logs and sets the gauge."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        today: Callable[[], date] | None = None,
        every: float = CHECK_EVERY_SECONDS,
    ) -> None:
        self._model = settings.openai_model
        self._metrics = metrics
        self._today = today or (lambda: datetime.now(UTC).date())
        self._every = every
        self._client = AsyncOpenAI(
            api_key=settings.openai_api_key or "unset",
            base_url=settings.openai_base_url or "https://api.openai.com/v1",
            timeout=LOOKUP_TIMEOUT,
            max_retries=1,
        )
        self.status = ModelStatus(model=self._model, note="not checked yet")
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> ModelStatus:
        self.status = await self._lookup()
        self._report(self.status)
        return self.status

    def start(self) -> None:
        """Check now and then every day, in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._client.close()

    async def _loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # a lookup bug must not end the daily check
                logger.warning("model lifecycle check failed: {}: {}", type(exc).__name__, exc)
            await asyncio.sleep(self._every)

    async def _lookup(self) -> ModelStatus:
        try:
            info = await self._client.models.retrieve(self._model)
        except NotFoundError:
            return ModelStatus(model=self._model, note="the server has no model lookup")
        except OpenAIError as exc:
            logger.debug("model lookup failed: {}: {}", type(exc).__name__, exc)
            return ModelStatus(
                model=self._model, note=f"model lookup failed ({type(exc).__name__})"
            )
        raw = getattr(info, "shutdown_date", None)
        if not raw:
            return ModelStatus(model=self._model)
        try:
            when = date.fromisoformat(str(raw)[:10])
        except ValueError:
            return ModelStatus(model=self._model, note="unreadable shutdown_date")
        return ModelStatus(
            model=self._model, shutdown_date=when, days_left=(when - self._today()).days
        )

    def _report(self, status: ModelStatus) -> None:
        gauge = self._metrics.llm_model_shutdown_days
        if status.days_left is None:
            with contextlib.suppress(KeyError):
                gauge.remove(status.model)
            return
        gauge.labels(status.model).set(status.days_left)
        when = status.shutdown_date.isoformat() if status.shutdown_date else "?"
        if status.shut_down:
            logger.error(
                "OPENAI_MODEL {} was shut down on {}: analyses fall back or fail until "
                "OPENAI_MODEL names a current model",
                status.model,
                when,
            )
        else:
            logger.warning(
                "OPENAI_MODEL {} shuts down on {} ({} days left): switch OPENAI_MODEL before then",
                status.model,
                when,
                status.days_left,
            )
