"""payload_hash reads the record's fields directly: the same bytes as the model_dump(mode="json")
it replaced, so hashes stored before the change still tell retries from conflicts."""

from __future__ import annotations

import hashlib
from datetime import timezone

import orjson
from hypothesis import given
from hypothesis import strategies as st

from services.core.events import TouchpointRecord
from services.scoring.consumer import PAYLOAD_FIELDS, payload_hash

OPTIONAL_TEXT = st.one_of(st.none(), st.text(max_size=8))
ATTRIBUTE_VALUES = st.one_of(
    st.text(max_size=8), st.booleans(), st.integers(-10, 10), st.floats(allow_nan=False, allow_infinity=False)
)


def dumped_hash(record: TouchpointRecord) -> bytes:
    content = record.model_dump(mode="json", include=set(PAYLOAD_FIELDS))
    content["occurred_at"] = record.occurred_at.astimezone(timezone.utc).isoformat()
    return hashlib.blake2b(orjson.dumps(content, option=orjson.OPT_SORT_KEYS), digest_size=16).digest()


@given(
    occurred_at=st.sampled_from(["2026-11-24T01:02:03.456789+09:00", "2026-11-24T01:02:03Z"]),
    touchpoint=OPTIONAL_TEXT,
    emotion=OPTIONAL_TEXT,
    experience=st.one_of(st.integers(0, 10), st.floats(0, 10)),
    revenue=st.one_of(st.none(), st.integers(0, 10**6), st.floats(0, 1e9)),
    attributes=st.one_of(st.none(), st.dictionaries(st.text(min_size=1, max_size=5), ATTRIBUTE_VALUES, max_size=4)),
)
def test_payload_hash_is_the_hash_of_the_dumped_fields(
    occurred_at, touchpoint, emotion, experience, revenue, attributes
):
    # As a record arrives: JSON, so that the fields hold what parsing gives (ints stay ints in attributes).
    value = orjson.dumps(
        {
            "tenant": "t", "event_id": "e-1", "occurred_at": occurred_at, "received_at": "2026-11-24T01:02:04Z",
            "customer_id": "c", "journey": "hotel", "stage": "stay", "touchpoint": touchpoint, "channel": "web",
            "experience": experience, "expectation": 5.0, "promise": 8.0, "weight": 1.0, "emotion": emotion,
            "revenue": revenue, "attributes": attributes,
        }
    )  # fmt: skip
    record = TouchpointRecord.model_validate_json(value)
    assert payload_hash(record) == dumped_hash(record)
