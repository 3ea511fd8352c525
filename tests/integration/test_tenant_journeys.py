"""Per-tenant journey maps through the admin endpoints (SPEC 2; access-control issue part 3):
validated against journey.schema.json, versioned and append-only, visible only to their tenant,
picked up by ingest and scoring of other processes within the refresh interval, and a new
version never rewrites what was scored before."""

from __future__ import annotations

import asyncio
import copy
import uuid
from contextlib import AsyncExitStack
from datetime import datetime, timedelta, timezone

import pytest

from services.api.app import create_app as create_api
from services.core.db.api_keys import create_key
from services.core.db.engine import create_engine
from services.ingest.app import create_app as create_ingest
from services.scoring.app import create_app as create_scoring
from tests.conftest import make_settings
from tests.e2e.test_pipeline import running, wait_until

pytestmark = pytest.mark.integration

POP_UP = {
    "id": "pop-up-store",
    "name": "Pop-up store",
    "revenue_threshold": 300.0,
    "stages": [
        {"id": "entry", "name": "Entry", "promise": 7.0, "touchpoints": ["door"]},
        {"id": "checkout", "name": "Checkout", "promise": 8.0, "touchpoints": ["till"]},
    ],
}


def event(event_id: str, customer_id: str, stage: str, experience: float, journey: str = "pop-up-store") -> dict:
    return {
        "event_id": event_id,
        "occurred_at": (datetime.now(timezone.utc) - timedelta(minutes=1)).isoformat(),
        "customer_id": customer_id,
        "journey": journey,
        "stage": stage,
        "experience": experience,
    }


def fields(response) -> set[str]:
    return {item["field"] for item in response.json()["detail"]}


@pytest.fixture(scope="module")
async def stack(postgres, kafka):
    """Two tenants' keys (admin, and a read-only one of A's) and the three services; each service
    re-reads the stored maps every 0.3 s."""
    settings = make_settings(postgres, kafka, auth_disabled=False, journeys_refresh_s=0.3)
    tenant_a, tenant_b = f"{settings.tenant}-a", f"{settings.tenant}-b"
    engine = create_engine(settings.database_url)
    try:
        keys = {
            "a": (await create_key(engine, tenant_a, "a-admin", ["admin"]))[1],
            "a-read": (await create_key(engine, tenant_a, "a-read", ["scores:read", "events:write"]))[1],
            "b": (await create_key(engine, tenant_b, "b-admin", ["admin"]))[1],
        }
    finally:
        await engine.dispose()
    headers = {name: {"Authorization": f"Bearer {key}"} for name, key in keys.items()}
    async with AsyncExitStack() as exits:
        await exits.enter_async_context(running(create_scoring(settings)))
        ingest = await exits.enter_async_context(running(create_ingest(settings)))
        api = await exits.enter_async_context(running(create_api(settings)))
        yield api, ingest, headers


async def test_a_journey_is_created_versioned_and_retired_with_its_history_kept(stack):
    api, _, headers = stack
    a = headers["a"]
    journey = {**POP_UP, "id": f"shop-{uuid.uuid4().hex[:6]}"}
    path = f"/v1/admin/journeys/{journey['id']}"

    listed = (await api.get("/v1/admin/journeys", headers=a)).json()["items"]
    assert {item["journey_id"]: (item["version"], item["source"]) for item in listed}["car-rental"] == (0, "shipped")

    created = await api.post("/v1/admin/journeys", json=journey, headers=a)
    assert created.status_code == 201, created.text
    assert created.json()["version"] == 1 and created.json()["source"] == "tenant"
    assert created.json()["created_by"] and created.headers["etag"] == '"1"' and created.headers["location"] == path
    again = await api.post("/v1/admin/journeys", json=journey, headers=a)
    assert again.status_code == 409 and fields(again) == {"body.id"}

    changed = copy.deepcopy(journey)
    changed["stages"][1]["promise"] = 6.0
    stale = await api.put(path, json=changed, headers={**a, "If-Match": '"0"'})
    assert stale.status_code == 412 and stale.json()["detail"][0]["allowed"] == '"1"'
    updated = await api.put(path, json=changed, headers={**a, "If-Match": '"1"'})
    assert updated.status_code == 200 and updated.json()["version"] == 2
    assert updated.json()["map"]["stages"][1]["promise"] == 6.0

    retired = await api.delete(path, headers=a)
    assert retired.status_code == 200 and retired.json()["retired"] and retired.json()["version"] == 3
    assert (await api.get(path, headers=a)).status_code == 404
    assert journey["id"] not in {item["id"] for item in (await api.get("/v1/journeys", headers=a)).json()["items"]}

    recreated = await api.post("/v1/admin/journeys", json=journey, headers=a)
    assert recreated.status_code == 201 and recreated.json()["version"] == 4  # the history continues
    history = (await api.get(f"{path}/versions", headers=a)).json()["items"]
    assert [(item["version"], item["retired"]) for item in history] == [(4, False), (3, True), (2, False), (1, False)]
    promises = [[stage["promise"] for stage in item["map"]["stages"]] if item["map"] else None for item in history]
    assert promises == [[7.0, 8.0], None, [7.0, 6.0], [7.0, 8.0]]  # every version kept as it was
    one = await api.get(f"{path}/versions/2", headers=a)
    assert one.status_code == 200 and one.json()["map"]["stages"][1]["promise"] == 6.0
    assert (await api.get(f"{path}/versions/9", headers=a)).status_code == 404


async def test_an_invalid_map_is_a_422_naming_every_wrong_field(stack):
    api, _, headers = stack
    broken = copy.deepcopy(POP_UP)
    broken["id"] = "Not A Slug"
    broken["stages"][0]["promise"] = 11
    del broken["name"]
    response = await api.post("/v1/admin/journeys", json=broken, headers=headers["a"])
    assert response.status_code == 422
    assert fields(response) == {"body.id", "body.stages.0.promise", "body.(root)"}, response.text
    assert all("journey.schema.json" in item["allowed"] for item in response.json()["detail"])

    duplicated = copy.deepcopy(POP_UP)
    duplicated["stages"][1]["id"] = "entry"
    response = await api.post("/v1/admin/journeys", json=duplicated, headers=headers["a"])
    assert response.status_code == 422 and fields(response) == {"body.stages"}
    assert "entry" in response.json()["detail"][0]["message"]

    mismatched = await api.put("/v1/admin/journeys/hotel", json=POP_UP, headers=headers["a"])
    assert mismatched.status_code == 422 and fields(mismatched) == {"body.id"}
    not_json_object = await api.post("/v1/admin/journeys", json=[POP_UP], headers=headers["a"])
    assert not_json_object.status_code == 422


async def test_only_admin_keys_change_maps_and_a_tenant_sees_only_its_own(stack):
    api, ingest, headers = stack
    journey = {**POP_UP, "id": f"kiosk-{uuid.uuid4().hex[:6]}"}
    denied = await api.post("/v1/admin/journeys", json=journey, headers=headers["a-read"])
    assert denied.status_code == 403 and "admin" in denied.text
    assert (await api.get("/v1/admin/journeys", headers=headers["a-read"])).status_code == 403
    assert (await api.post("/v1/admin/journeys", json=journey)).status_code == 401

    assert (await api.post("/v1/admin/journeys", json=journey, headers=headers["a"])).status_code == 201
    mine = {item["id"] for item in (await api.get("/v1/journeys", headers=headers["a-read"])).json()["items"]}
    theirs = {item["id"] for item in (await api.get("/v1/journeys", headers=headers["b"])).json()["items"]}
    assert journey["id"] in mine and journey["id"] not in theirs
    # B cannot tell A's journey from one that never existed.
    guessed = await api.get(f"/v1/admin/journeys/{journey['id']}", headers=headers["b"])
    never = await api.get("/v1/admin/journeys/never-existed", headers=headers["b"])
    assert guessed.status_code == never.status_code == 404
    assert guessed.json()["detail"][0]["message"].replace(journey["id"], "x") == never.json()["detail"][0][
        "message"
    ].replace("never-existed", "x")
    assert (await api.get(f"/v1/admin/journeys/{journey['id']}/versions", headers=headers["b"])).status_code == 404
    # B's events naming A's journey are refused, once ingest has the maps A stored.
    async def refused_for_b():
        response = await ingest.post("/v1/events", json=event(str(uuid.uuid4()), "c1", "entry", 5, journey["id"]),
                                     headers=headers["b"])  # fmt: skip
        return response.status_code == 422 and fields(response) == {"journey"}

    assert await refused_for_b()
    # B may create a journey of the same id: its own, independent of A's.
    assert (await api.post("/v1/admin/journeys", json=journey, headers=headers["b"])).json()["version"] == 1


async def test_a_new_promise_applies_from_then_on_and_never_rewrites_what_was_scored(stack):
    api, ingest, headers = stack
    a = headers["a"]
    journey = {**POP_UP, "id": f"store-{uuid.uuid4().hex[:6]}"}
    assert (await api.post("/v1/admin/journeys", json=journey, headers=a)).status_code == 201
    stages_path = f"/v1/journeys/{journey['id']}/stages"

    async def post_when_known(item: dict) -> None:
        async def accepted():  # ingest re-reads the maps every 0.3 s
            return (await ingest.post("/v1/events", json=item, headers=a)).status_code == 202

        await wait_until(accepted, timeout_s=10)

    async def checkout(events: int) -> dict | None:
        response = await api.get(stages_path, params={"window": "1h"}, headers=a)
        rows = {row["stage"]: row for row in response.json()["stages"]}
        return rows["checkout"] if rows["checkout"]["events"] == events else None

    # v1: promise 8; experience 7 falls short by 1.
    await post_when_known(event(str(uuid.uuid4()), "c-1", "checkout", 7, journey["id"]))
    first = await wait_until(lambda: checkout(1), timeout_s=30)
    assert first["mean_gap"] == pytest.approx(-1.0) and first["promise_kept_rate"] == 0.0

    changed = copy.deepcopy(journey)
    changed["stages"][1]["promise"] = 6.0
    assert (await api.put(f"/v1/admin/journeys/{journey['id']}", json=changed, headers=a)).json()["version"] == 2

    # v2: promise 6; the same experience now beats it by 1. Ingest is another app that re-reads
    # the maps every 0.3 s: give it five intervals.
    await asyncio.sleep(1.5)
    await ingest.post("/v1/events", json=event(str(uuid.uuid4()), "c-2", "checkout", 7, journey["id"]), headers=a)
    both = await wait_until(lambda: checkout(2), timeout_s=30)
    # The first event keeps its -1 (scored with promise 8), the second has +1: the mean is 0.
    assert both["mean_gap"] == pytest.approx(0.0) and both["promise_kept_rate"] == 0.5
    assert both["promise"] == 6.0  # the figures show the current promise
    customer = (await api.get("/v1/customers/c-1", headers=a)).json()
    assert [stage["gap"] for stage in customer["stages"]] == [pytest.approx(-1.0)]  # untouched by v2
