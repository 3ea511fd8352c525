"""Fuzzing: generated requests against both OpenAPI documents, and hostile JSON against ingest.

Schemathesis generates requests for every operation of the ingest and API documents, valid
(positive) and invalid (negative), a bounded number each. No answer may be a 5xx, every 4xx must
have the documented error body, and every documented answer must match its schema. Hypothesis
then feeds ingest JSON built to hurt a parser or a validator; each is refused with a 4xx and
none reaches the topic.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import contextmanager
from datetime import datetime, timezone

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from jsonschema import Draft202012Validator
from schemathesis import GenerationMode
from schemathesis.checks import response_schema_conformance

from services.core.db.api_keys import create_key
from services.core.db.engine import create_engine
from services.ingest.openapi import EVENT_SCHEMA
from tests.conftest import make_settings
from tests.faults.support import service_process
from tests.integration.test_ingest import topic_event_ids

pytestmark = pytest.mark.integration

CASES_PER_MODE = 15  # per operation: 15 valid and 15 invalid requests
NEGATIVE_BODY_LIMIT = 64 * 1024


@contextmanager
def fuzz_stack(postgres, kafka):
    # No rate limit: hundreds of requests in seconds from one key are the point here.
    settings = make_settings(postgres, kafka, auth_disabled=False, rate_limit_per_s=0)

    async def new_key() -> str:
        engine = create_engine(settings.database_url)
        try:
            return (await create_key(engine, settings.tenant, "fuzz", ["admin"]))[1]
        finally:
            await engine.dispose()

    key = asyncio.run(new_key())
    # The services as their own processes, as production runs them. (`make test` also runs this
    # file in an interpreter of its own: see the Makefile on CPython 3.11's AST bug.)
    with service_process("ingest", settings) as ingest_url, service_process("api", settings) as api_url:
        deadline = time.monotonic() + 30
        while httpx.get(f"{ingest_url}/readyz").status_code != 200:
            assert time.monotonic() < deadline, "ingest not ready"
            time.sleep(0.1)
        yield settings, {"Authorization": f"Bearer {key}"}, ingest_url, api_url


@pytest.fixture(scope="module")
def stack(postgres, kafka):
    with fuzz_stack(postgres, kafka) as running:
        yield running


def assert_error_body(body, where: str) -> None:
    """The documented 4xx body: {"detail": [{"field", "message", "allowed"?}, ...]}."""
    assert isinstance(body, dict) and set(body) == {"detail"}, where
    assert isinstance(body["detail"], list) and body["detail"], where
    for item in body["detail"]:
        assert set(item) <= {"field", "message", "allowed"} and {"field", "message"} <= set(item), where
        assert isinstance(item["field"], str) and isinstance(item["message"], str) and item["message"], where
        allowed = item.get("allowed")
        assert allowed is None or isinstance(allowed, str) or (
            isinstance(allowed, list) and all(isinstance(value, str) for value in allowed)
        ), where


def assert_batch_outcome(body, where: str) -> None:
    assert set(body) == {"accepted", "rejected", "results"} and body["accepted"] == 0, where
    for result in body["results"]:
        assert result["status"] == "rejected", where
        assert_error_body({"detail": result["errors"]}, where)


def check(case, response) -> None:
    where = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
    assert response.status_code < 500, where
    if 400 <= response.status_code < 500:
        body = json.loads(response.content)
        if case.path == "/v1/events:batch" and response.status_code == 422 and "results" in body:
            assert_batch_outcome(body, where)
        else:
            assert_error_body(body, where)
    # The documented schema of the answer, where the status is documented.
    case.validate_response(response, checks=[response_schema_conformance])


def fuzz_document(base_url: str, headers: dict[str, str]) -> list[str]:
    schema = schemathesis.openapi.from_dict(httpx.get(f"{base_url}/openapi.json").json())
    fuzzed = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path == "/v1/alerts/stream":
            continue  # an endless stream; its parameters are fuzzed through a bounded read below
        rounds = [(mode, None, CASES_PER_MODE) for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
        if "{journey}" in operation.path:
            # Random journey names all end in 404: a known journey and stage reach the window and step parsing.
            known = {"journey": "car-rental", "stage": "pickup"}
            if "{stage}" not in operation.path:
                known = {"journey": "hotel"}
            rounds += [(mode, known, CASES_PER_MODE // 2) for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
        for mode, path_parameters, cases in rounds:

            @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
            @hypothesis_settings(
                max_examples=cases, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck),
            )  # fmt: skip
            def run(case):
                response = case.call(base_url=base_url, headers=headers, timeout=10)
                check(case, response)

            try:
                run()
            except Unsatisfiable:
                assert mode == GenerationMode.NEGATIVE, operation.path  # nothing to get wrong (no parameters)
        fuzzed.append(f"{operation.method.upper()} {operation.path}")
    return fuzzed


@pytest.mark.timeout(180)
def test_no_generated_request_gets_a_5xx_and_every_4xx_has_the_documented_body(stack):
    _, headers, ingest_url, api_url = stack
    started = time.monotonic()
    fuzzed = fuzz_document(ingest_url, headers) + fuzz_document(api_url, headers)
    assert {"POST /v1/events", "POST /v1/events:batch", "GET /v1/customers/{customer_id}",
            "POST /v1/alerts/{alert_id}/acknowledge"} <= set(fuzzed)  # fmt: skip
    # Without a key, every operation of both documents is a 401 with the same body shape.
    for base_url in (ingest_url, api_url):
        for path, item in httpx.get(f"{base_url}/openapi.json").json()["paths"].items():
            if path.startswith("/v1/"):
                for method in item:
                    response = httpx.request(method, base_url + path.replace("{", "").replace("}", ""))
                    assert response.status_code == 401
                    assert_error_body(response.json(), f"{method} {path}")
    assert time.monotonic() - started < 90


@given(last_event_id=st.text(max_size=40) | st.integers(min_value=-(10**30), max_value=10**30).map(str))
@hypothesis_settings(max_examples=30, deadline=None, database=None, derandomize=True,
                     suppress_health_check=list(HealthCheck))  # fmt: skip
def test_the_alert_stream_refuses_bad_resume_ids_and_streams_good_ones(stack, last_event_id):
    _, headers, _, api_url = stack
    with httpx.stream("GET", f"{api_url}/v1/alerts/stream", params={"last_event_id": last_event_id},
                      headers={**headers, "Last-Event-ID": last_event_id} if last_event_id.isascii() and
                      last_event_id.isprintable() else headers, timeout=10) as response:  # fmt: skip
        assert response.status_code in (200, 422), response.status_code
        if response.status_code == 422:
            assert_error_body(json.loads(response.read()), last_event_id)
        else:
            assert response.headers["content-type"].startswith("text/event-stream")


# --------------------------------------------------------------------------------------------
# Hostile JSON against ingest.


def deep(levels: int, opener: str, closer: str) -> bytes:
    return (opener * levels + closer * levels).encode()


HOSTILE_BODIES = [
    deep(100_000, "[", "]"),
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b'{"events": ' + deep(10_000, "[", "]") + b"}",
    b'{"event_id": "x", "experience": NaN}',
    b'{"event_id": "x", "experience": Infinity}',
    b'{"event_id": "x", "experience": -Infinity}',
    b'{"event_id": "x", "experience": 1e999999}',
    b'{"event_id": "x", "experience": ' + b"9" * 5000 + b"}",
    b'{"event_id": "x", "revenue": -0.0e-99999}',
    b'{"event_id": "\xff\xfe\xfd"}',
    b'{"customer_id": "\xed\xa0\x80"}',  # a UTF-16 surrogate encoded as UTF-8
    b'{"customer_id": "\\ud800"}',  # a lone surrogate escape
    b"\xef\xbb\xbf{}",  # a byte-order mark
    b'{"event_id": "a\\u0000b"}',
    b'{"event_id": "a", "event_id": "b"}',
    b"",
    b"null",
    b"[]",
    b'"just a string"',
    b"{" * 10,
    b'{"events": null}',
    b'{"events": [null, 1, "x", [], {}]}',
    b'{"events": {"0": {}}}',
    b'{"customer_id": "' + b"A" * 200_000 + b'"}',
    b'{"attributes": {' + b",".join(b'"k%d": %d' % (n, n) for n in range(5000)) + b"}}",
]

control_characters = st.text(alphabet=st.characters(max_codepoint=0x9F, categories=["Cc"]), min_size=1, max_size=20)
hostile_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda value: value != value or abs(value) > 1e300),
    st.integers(min_value=10**18, max_value=10**400),
    st.integers(max_value=-(10**18), min_value=-(10**400)),
    control_characters,
    st.text(min_size=2_000, max_size=70_000),
    st.text(alphabet=st.characters(categories=["Cs"]), min_size=1, max_size=50),  # lone surrogates
    st.recursive(st.none() | st.booleans(), lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(max_size=5), inner, max_size=3), max_leaves=50),
)


def valid_event(event_id: str) -> dict:
    return {
        "event_id": event_id,
        "occurred_at": datetime.now(timezone.utc).isoformat(),
        "customer_id": "fuzz-customer",
        "journey": "car-rental",
        "stage": "pickup",
        "experience": 5,
    }


def post(url: str, headers: dict, body: bytes, content_type: str = "application/json") -> httpx.Response:
    return httpx.post(url, content=body, headers={**headers, "content-type": content_type}, timeout=30)


def assert_refused(response: httpx.Response, what: str) -> None:
    assert 400 <= response.status_code < 500, (what, response.status_code, response.text[:300])
    body = response.json()
    if "results" in body:
        assert_batch_outcome(body, what)
    else:
        assert_error_body(body, what)


@pytest.mark.timeout(180)
def test_hostile_json_is_refused_cleanly_and_never_reaches_the_topic(postgres, kafka):
    with fuzz_stack(postgres, kafka) as (settings, headers, ingest_url, _):
        single, batch = f"{ingest_url}/v1/events", f"{ingest_url}/v1/events:batch"
        for body in HOSTILE_BODIES:
            assert_refused(post(single, headers, body), body[:40])
            assert_refused(post(batch, headers, body), body[:40])
            assert_refused(post(batch, headers, body, "application/x-ndjson"), body[:40])

        accepted: list[str] = []
        schema = Draft202012Validator(EVENT_SCHEMA)
        counter = iter(range(10**6))

        @given(field=st.sampled_from(["event_id", "occurred_at", "customer_id", "journey", "stage", "touchpoint",
                                      "experience", "expectation", "scale", "revenue", "attributes", "emotion"]),
               value=hostile_values, wrap=st.booleans())  # fmt: skip
        @hypothesis_settings(max_examples=80, deadline=None, database=None, derandomize=True,
                             suppress_health_check=list(HealthCheck))  # fmt: skip
        def hostile_field(field, value, wrap):
            event = {**valid_event(f"hostile-{next(counter)}"), field: value}
            # orjson refuses NaN, huge integers and lone surrogates: the stdlib writes them, as a client might.
            body = json.dumps({"events": [event]} if wrap else event, allow_nan=True).encode("utf-8", "surrogatepass")
            response = post(batch if wrap else single, headers, body)
            what = f"{field}={value!r:.80}"
            if response.status_code == 202:
                # Some of it is fine where it lands (None: an optional field left out; any text in an
                # attribute value): accepted only if the contract accepts it, and then on the topic.
                assert schema.is_valid(event), what
                accepted.append(event["event_id"])
            else:
                assert_refused(response, what)

        hostile_field()
        # A valid event after all that: the topic holds it and what the contract accepted, nothing else.
        assert post(single, headers, orjson.dumps(valid_event("the-last-one"))).status_code == 202
        on_topic = asyncio.run(topic_event_ids(settings))
        assert on_topic == sorted([*accepted, "the-last-one"])
        assert len(accepted) < 40  # most of the input was hostile wherever it went
