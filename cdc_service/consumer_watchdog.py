"""The durable consumer's watchdog: recreates the durable if someone deletes it while the service runs, restores its
configuration if someone edits it, and reports the ack floor and backlog. Without it a replica idles forever (the
durable is gone) or skips events for good (its filter was narrowed). Runs on the loop thread, which owns ``js``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from cdc_service.adapters.nats_jetstream import consumer_config, consumer_drift, ensure_consumer
from cdc_service.config import IngestSettings
from cdc_service.metrics import Metrics

STREAM_NOT_FOUND = 10059  # JetStream API error code; 10014 is "consumer not found"


class ConsumerWatchdog:
    """Checks the durable of ``ingest`` every ``ingest.consumer_check_interval`` seconds (``run``) or once
    (``check``). ``problem`` is what readiness reports while the durable or its stream is missing (None when all is
    well); ``ack_floor`` is the highest ack floor seen under the configured filter, where a recreated durable
    resumes; ``backlog`` is the durable's pending count at the last check (None before the first)."""

    def __init__(
        self,
        js: JetStreamContext,
        ingest: IngestSettings,
        metrics: Metrics,
        log: logging.Logger,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._js = js
        self._ingest = ingest
        self._metrics = metrics
        self._log = log
        self._sleep = sleep  # the period's clock; a test passes one that returns at once
        self.problem: str | None = None
        self.ack_floor = 0
        self.backlog: int | None = None

    async def run(self) -> None:
        """Check every period until cancelled. A check that fails (disconnected, timeout) decides nothing: it is
        logged at debug and asked again next period."""
        while True:
            await self._sleep(self._ingest.consumer_check_interval)
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._log.debug("consumer check failed", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})

    async def check(self) -> None:
        """One check: record floor and backlog, restore an edited durable, recreate a deleted one. Raises what the
        server's answer does not decide (anything but "not found")."""
        ingest = self._ingest
        try:
            info = await self._js.consumer_info(ingest.stream, ingest.durable)
            drift = consumer_drift(consumer_config(ingest), info.config)
            if drift:
                await self._restore(drift)
                return
            # Only an ack floor reached under the configured filter is a safe place to resume from.
            self.ack_floor = max(self.ack_floor, int(info.ack_floor.stream_seq or 0))
            self._metrics.ack_floor.set(self.ack_floor)
            self.backlog = int(info.num_pending or 0)
            self._metrics.backlog.set(self.backlog)
            self.problem = None
            return
        except NotFoundError as exc:  # also from a restore whose durable vanished meanwhile
            if exc.err_code == STREAM_NOT_FOUND:
                # Streams are only created at start-up: a stream deleted under us is an operator's decision.
                self.problem = "input stream missing"
                self._log.error("input stream is missing; not recreating it", extra={"stream": ingest.stream})
                return
        await self._recreate()

    async def _recreate(self) -> None:
        ingest = self._ingest
        self.problem = "consumer missing"
        self._log.warning("durable consumer is missing; recreating it", extra={"consumer": ingest.durable})
        # Resume after the last ack floor this replica saw: everything up to it was acked; what follows and was
        # already published comes again and is dropped by the dedup windows (Redis TTL, JetStream's window).
        await ensure_consumer(self._js, ingest, resume_after=self.ack_floor)
        # No re-bind in either mode: push keeps its core subscription on the fixed deliver subject and queue group,
        # which the new consumer delivers to; pull fetches by durable name. tests/integration/
        # test_consumer_recreated.py proves both keep receiving.
        self._metrics.consumer_recreated.inc()
        self.problem = None
        self._log.info("durable consumer recreated", extra={"consumer": ingest.durable})

    async def _restore(self, drift: list[str]) -> None:
        """Bring an edited durable back to the settings.

        A changed filter let the durable's floor move past the events it no longer matched: those would be skipped
        for good, so the durable is recreated to resume after the last ack floor seen under the configured filter
        (what comes again and was already published is dropped by the dedup windows). Other fields are updated in
        place, which keeps the delivery state.
        """
        ingest = self._ingest
        for name in drift:
            self._metrics.consumer_drift.labels(name).inc()
        self._log.critical(
            "the durable consumer's configuration was changed outside this service; restoring the settings",
            extra={"consumer": ingest.durable, "fields": drift, "resume_after": self.ack_floor},
        )
        if "filter_subjects" in drift:
            await self._js.delete_consumer(ingest.stream, ingest.durable)
            await ensure_consumer(self._js, ingest, resume_after=self.ack_floor)
        else:
            await ensure_consumer(self._js, ingest)
        self._log.info("durable consumer restored", extra={"consumer": ingest.durable, "fields": drift})
