"""Webhook deliveries: the sender of the store's outbox.

`WebhookDispatcher.run_once()` is one sweep: claim the due deliveries (the claim itself pushes
each one's next attempt a lease into the future, so concurrent sweeps in several processes never
send the same row at once and a sender that dies mid-send leaves it due again), POST each signed
body, and record the outcome: 2xx -> succeeded; anything else (3xx included: redirects are not
followed), a timeout or a refused target -> retried after base * 2**(attempt-1) seconds (capped),
failed after `webhook_max_attempts`. At least once: a receiver may see one event twice and
dedupes on `webhook-id`, which is the delivery's id and the same on every retry.

Where it runs: `WebhookThread`, a daemon thread in every worker process (started with the
reaper on Celery's worker_ready) and in the API process (`webhook_dispatcher`). Nothing here
imports torch.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import httpx

from service.core import webhooks as wh
from service.core.config import Settings
from service.core.domain import WebhookDelivery, WebhookEndpoint
from service.core.errors import InvalidInput

log = logging.getLogger("tuneserve.webhooks")

USER_AGENT = "tuneserve-webhooks/1"
_MAX_ERROR_CHARS = 500


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class SendResult:
    status_code: int | None  # None: no HTTP answer (timeout, refused, connection error)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class WebhookSender:
    """One signed POST. Short timeout, no redirects, no proxies from the environment, and the
    target policy checked again right before sending (a name may have been re-pointed)."""

    def __init__(self, settings: Settings, *, transport: httpx.BaseTransport | None = None,
                 resolve: wh.Resolver = wh.resolve_host):
        self.settings = settings
        self.resolve = resolve
        self._client = httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False,
                                    trust_env=False, transport=transport,
                                    headers={"user-agent": USER_AGENT})

    def close(self) -> None:
        self._client.close()

    def send(self, endpoint: WebhookEndpoint, msg_id: str, payload: str) -> SendResult:
        try:
            wh.check_target_url(endpoint.url, allow_private=self.settings.webhook_private_urls_allowed,
                                resolve=self.resolve)
        except InvalidInput as exc:
            return SendResult(None, exc.message)
        # The receiver checks the timestamp against its own clock: always the real time.
        headers = wh.signed_headers(endpoint.signing_secrets(_utcnow()), msg_id, int(time.time()), payload)
        headers["content-type"] = "application/json"
        try:
            response = self._client.post(endpoint.url, content=payload.encode("utf-8"), headers=headers)
        except httpx.TimeoutException:
            return SendResult(None, f"timed out after {self.settings.webhook_timeout_s:g} s")
        except Exception as exc:  # any failure (HTTP, invalid URL or IDNA, OS) ends this attempt, not the sweep
            return SendResult(None, f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS])
        if 200 <= response.status_code < 300:
            return SendResult(response.status_code)
        why = f"HTTP {response.status_code}"
        if 300 <= response.status_code < 400:
            why += " (redirects are not followed)"
        return SendResult(response.status_code, why)


def backoff_s(attempt: int, settings: Settings) -> float:
    """Wait after failed attempt number `attempt` (1-based): base, 2 base, 4 base, ... capped."""
    return min(settings.webhook_backoff_max_s, settings.webhook_backoff_base_s * 2 ** max(0, attempt - 1))


@dataclass
class DispatchReport:
    delivered: list[str] = field(default_factory=list)
    retrying: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class WebhookDispatcher:
    """`clock` gives the scheduling time (tests pass their own: no sleeping through backoffs)."""

    CHUNK = 5       # claimed together; the lease covers sending all of them one after another
    PER_SWEEP = 50  # at most this many sends per sweep, so one sweep stays bounded

    def __init__(self, store, settings: Settings, sender: WebhookSender | None = None, *,
                 clock: Callable[[], datetime] = _utcnow):
        self.store = store
        self.settings = settings
        self.sender = sender or WebhookSender(settings)
        self.clock = clock

    def close(self) -> None:
        self.sender.close()

    def run_once(self) -> DispatchReport:
        report = DispatchReport()
        # Long enough that no other sender re-takes a claimed row while this one still works on
        # its chunk (each send is bounded by the timeout); short enough that a sender that died
        # delays the retry by about a minute only.
        lease = timedelta(seconds=self.CHUNK * self.settings.webhook_timeout_s + 30.0)
        sent = 0
        while sent < self.PER_SWEEP:
            chunk = self.store.claim_due_deliveries(self.clock(), limit=self.CHUNK, lease=lease)
            for delivery, endpoint in chunk:
                self._deliver(delivery, endpoint, report)
            sent += len(chunk)
            if len(chunk) < self.CHUNK:
                break
        return report

    def _deliver(self, delivery: WebhookDelivery, endpoint: WebhookEndpoint, report: DispatchReport) -> None:
        result = self.sender.send(endpoint, delivery.id, delivery.payload)
        now = self.clock()
        retry_at = None
        if not result.ok and delivery.attempts < self.settings.webhook_max_attempts:
            retry_at = now + timedelta(seconds=backoff_s(delivery.attempts, self.settings))
        self.store.finish_delivery_attempt(delivery.id, status_code=result.status_code, error=result.error,
                                           now=now, retry_at=retry_at)
        if result.ok:
            report.delivered.append(delivery.id)
        elif retry_at is not None:
            report.retrying.append(delivery.id)
            log.info("webhook %s to %s: %s; attempt %d, retrying at %s", delivery.id, endpoint.id,
                     result.error, delivery.attempts, retry_at.isoformat())
        else:
            report.failed.append(delivery.id)
            log.warning("webhook %s to %s: %s; gave up after %d attempts", delivery.id, endpoint.id,
                        result.error, delivery.attempts)


class WebhookThread(threading.Thread):
    """Runs `WebhookDispatcher.run_once()` every `webhook_interval_s` (worker or API process)."""

    def __init__(self, settings: Settings):
        super().__init__(name="tuneserve-webhooks", daemon=True)
        self.settings = settings
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        from service.core.store import Store

        store = dispatcher = None
        while not self._stop_event.is_set():
            try:
                if dispatcher is None:
                    store = Store(self.settings.resolved_database_url)
                    dispatcher = WebhookDispatcher(store, self.settings)
                dispatcher.run_once()
            except Exception:  # the database may be briefly away: try again next time
                log.exception("webhook sweep failed")
            self._stop_event.wait(self.settings.webhook_interval_s)
        if dispatcher is not None:
            dispatcher.close()
        if store is not None:
            store.close()
