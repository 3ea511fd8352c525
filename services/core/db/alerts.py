"""Writing to the alert transition log, shared by scoring (automatic changes) and the API (people's).

`alert_transitions.seq` is what Server-Sent Events resume from and what the outbox relays advance
over, so a reader must never see seq n+1 before n has committed. Sequence values are handed out in
the order transactions ask for them, not the order they commit; every writer therefore takes the
same transaction-scoped advisory lock just before it inserts, and holds it until it commits. A
writer takes its row locks on `alerts` before this lock and none after, so it cannot deadlock.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncConnection

from services.core import metrics

# pg_advisory_xact_lock(class, key): 'CEM' and the transition log.
LOCK_CLASS = 0x43454D
TRANSITION_LOG_LOCK = 1

ALERT_COLUMNS = (
    "id, kind, subject, journey, severity, status, opened_at, updated_at, acknowledged_at, resolved_at, "
    "revenue_at_stake, evidence, acknowledged_by, resolved_by, note"
)


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


@dataclass(frozen=True)
class NewTransition:
    tenant: str
    alert_id: uuid.UUID
    kind: str
    subject: str
    from_status: str | None
    to_status: str
    at: datetime
    payload: dict[str, Any]


_INSERT_TRANSITIONS = text(
    "INSERT INTO alert_transitions (tenant, alert_id, kind, subject, from_status, to_status, at, payload) "
    "SELECT tenant, alert_id, kind, subject, from_status, to_status, at, payload FROM unnest("
    "CAST(:tenants AS text[]), CAST(:alert_ids AS uuid[]), CAST(:kinds AS text[]), CAST(:subjects AS text[]), "
    "CAST(:from_statuses AS text[]), CAST(:to_statuses AS text[]), CAST(:ats AS timestamptz[]), "
    "CAST(:payloads AS jsonb[])) WITH ORDINALITY "
    "AS u(tenant, alert_id, kind, subject, from_status, to_status, at, payload, position) "
    "ORDER BY position RETURNING seq"
)


async def record_transitions(conn: AsyncConnection, transitions: list[NewTransition]) -> list[int]:
    """Append transitions (in list order) inside the caller's transaction; their seqs.

    Counts them in cem_alert_transitions_total when, and only if, the transaction commits.
    """
    if not transitions:
        return []
    await conn.execute(
        text("SELECT pg_advisory_xact_lock(:lock_class, :key)"), {"lock_class": LOCK_CLASS, "key": TRANSITION_LOG_LOCK}
    )
    rows = await conn.execute(
        _INSERT_TRANSITIONS,
        {
            "tenants": [item.tenant for item in transitions],
            "alert_ids": [item.alert_id for item in transitions],
            "kinds": [item.kind for item in transitions],
            "subjects": [item.subject for item in transitions],
            "from_statuses": [item.from_status for item in transitions],
            "to_statuses": [item.to_status for item in transitions],
            "ats": [item.at for item in transitions],
            "payloads": [dumps(item.payload) for item in transitions],
        },
    )
    counts = Counter((item.kind, item.to_status) for item in transitions)

    def count(_connection) -> None:
        for (kind, to_status), number in counts.items():
            metrics.ALERT_TRANSITIONS.labels(kind, to_status).inc(number)

    event.listen(conn.sync_connection, "commit", count, once=True)
    return [row.seq for row in rows]
