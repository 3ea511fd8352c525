"""The alert outbox relays: alert_transitions, in seq order, to the Kafka topic and to a webhook.

Transitions are written in the transactions that make them (scoring batches, the API's
acknowledge and resolve); a relay delivers them after they commit and then advances its position
in alert_outbox_positions. A crash between the two delivers again: at-least-once, and a consumer
de-duplicates by `seq`. Each relay runs in every scoring replica, but only the one holding the
relay's session advisory lock works; if it dies, its connection closes, the lock goes and another
takes over. Relays run beside the consumer loop and never block it.

- Kafka: every transition to `alerts_topic`, key = subject, value = the transition document
  (services.core.alerting.transition_document), header schema=alert.v1, acks=all. A failed
  send is retried (the position does not move) until the broker takes it. Starts from the log's
  beginning the first time.
- Webhook (`CEM_ALERT_WEBHOOK_URL`): the same JSON POSTed, signed with
  `X-CEM-Signature: sha256=<hex HMAC-SHA256 of the body with CEM_ALERT_WEBHOOK_SECRET>`;
  retried with exponential backoff up to `alert_webhook_max_attempts`, then counted in
  cem_alert_webhook_failures_total and skipped, so one bad endpoint cannot stall the log. Starts
  at the end of the log the first time (a new endpoint is not sent the history).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.core import metrics
from services.core.alerting import transition_document
from services.core.db.alerts import LOCK_CLASS
from services.core.kafka import ALERT_SCHEMA_HEADER, create_producer, ensure_topics
from services.core.settings import Settings

log = logging.getLogger("cem.scoring.relay")

Deliver = Callable[[list[dict[str, Any]]], Awaitable[None]]

LEADER_RETRY_S = 5.0
MAX_BACKOFF_S = 10.0


async def _position(conn, relay: str, start_at_end: bool) -> int:
    await conn.execute(
        text(
            "INSERT INTO alert_outbox_positions (relay, last_seq) "
            "SELECT :relay, CASE WHEN CAST(:at_end AS boolean) THEN coalesce(max(seq), 0) ELSE 0 END "
            "FROM alert_transitions "
            "ON CONFLICT (relay) DO NOTHING"
        ),
        {"relay": relay, "at_end": start_at_end},
    )
    return await conn.scalar(text("SELECT last_seq FROM alert_outbox_positions WHERE relay = :relay"), {"relay": relay})


async def run_relay(
    engine: AsyncEngine,
    relay: str,
    deliver: Deliver,
    *,
    interval_s: float,
    start_at_end: bool = False,
    batch_size: int = 500,
) -> None:
    """Deliver transitions to `deliver` in seq order, forever (cancel to stop)."""
    backoff = interval_s
    while True:
        try:
            async with engine.connect() as conn:
                leader = await conn.scalar(
                    text("SELECT pg_try_advisory_lock(:lock_class, hashtext(:relay))"),
                    {"lock_class": LOCK_CLASS, "relay": relay},
                )
                await conn.commit()
                if leader:
                    try:
                        log.info("alert relay %s: delivering", relay)
                        backoff = interval_s
                        await _deliver_forever(conn, relay, deliver, interval_s, start_at_end, batch_size)
                    finally:
                        # The session lock must not go back to the pool with the connection.
                        with contextlib.suppress(Exception):
                            await conn.invalidate()
            await asyncio.sleep(LEADER_RETRY_S)  # another replica delivers; take over if it goes
        except asyncio.CancelledError:
            raise
        except Exception as error:  # database down: try again later
            log.warning("alert relay %s failed (%s); retrying in %.1f s", relay, error, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)


async def _deliver_forever(conn, relay, deliver, interval_s, start_at_end, batch_size) -> None:
    position = await _position(conn, relay, start_at_end)
    await conn.commit()
    delay = interval_s
    while True:
        rows = (
            await conn.execute(
                text(
                    "SELECT seq, tenant, alert_id, kind, subject, from_status, to_status, at, payload "
                    "FROM alert_transitions WHERE seq > :position ORDER BY seq LIMIT :limit"
                ),
                {"position": position, "limit": batch_size},
            )
        ).all()
        await conn.commit()  # no snapshot or transaction held while delivering
        if not rows:
            await asyncio.sleep(interval_s)
            continue
        try:
            await deliver([transition_document(row) for row in rows])
        except Exception as error:  # the destination is down: the same rows again, later
            log.warning("alert relay %s: delivery failed (%s); retrying in %.1f s", relay, error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_S)
            continue
        delay = interval_s
        position = rows[-1].seq
        await conn.execute(
            text("UPDATE alert_outbox_positions SET last_seq = :position, updated_at = now() WHERE relay = :relay"),
            {"relay": relay, "position": position},
        )
        await conn.commit()


def encode(document: dict[str, Any]) -> bytes:
    return orjson.dumps(document)


class KafkaAlerts:
    """Deliver: publish to the alerts topic, acks=all; raises if the broker does not take them all."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.producer: AIOKafkaProducer | None = None

    async def __call__(self, documents: list[dict[str, Any]]) -> None:
        if self.producer is None:
            await ensure_topics(self.settings)
            producer = create_producer(self.settings)
            try:
                await producer.start()
            except Exception:
                await producer.stop()
                raise
            self.producer = producer
        futures = [
            await self.producer.send(
                self.settings.alerts_topic,
                key=document["subject"].encode(),
                value=encode(document),
                headers=[ALERT_SCHEMA_HEADER],
            )
            for document in documents
        ]
        await asyncio.gather(*futures)

    async def close(self) -> None:
        if self.producer is not None:
            await self.producer.stop()
            self.producer = None


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookAlerts:
    """Deliver: POST each transition; bounded retries, then counted and skipped. Never raises."""

    def __init__(self, settings: Settings, first_backoff_s: float = 0.5):
        self.url = settings.alert_webhook_url
        self.secret = settings.alert_webhook_secret.get_secret_value() if settings.alert_webhook_secret else None
        self.max_attempts = settings.alert_webhook_max_attempts
        self.first_backoff_s = first_backoff_s
        import httpx  # only with a webhook configured: the import is 0.1 s of every start-up

        self.client = httpx.AsyncClient(timeout=settings.alert_webhook_timeout_s)

    async def __call__(self, documents: list[dict[str, Any]]) -> None:
        for document in documents:
            await self.post(document)

    async def post(self, document: dict[str, Any]) -> bool:
        import httpx  # loaded by __init__ already

        body = encode(document)
        headers = {"content-type": "application/json", "x-cem-event-id": str(document["seq"])}
        if self.secret is not None:
            headers["x-cem-signature"] = signature(self.secret, body)
        delay = self.first_backoff_s
        for attempt in range(1, self.max_attempts + 1):
            try:
                response = await self.client.post(self.url, content=body, headers=headers)
                if 200 <= response.status_code < 300:
                    return True
                why = f"HTTP {response.status_code}"
            except httpx.HTTPError as error:
                why = f"{type(error).__name__}: {error}"
            if attempt < self.max_attempts:
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
        metrics.ALERT_WEBHOOK_FAILURES.inc()
        log.warning("alert webhook gave up on transition %s after %d attempts: %s", document["seq"], attempt, why)
        return False

    async def close(self) -> None:
        await self.client.aclose()


def webhook_relay_name(url: str) -> str:
    return "webhook:" + hashlib.sha256(url.encode()).hexdigest()[:16]


def kafka_relay_name(settings: Settings) -> str:
    return f"kafka:{settings.alerts_topic}"
