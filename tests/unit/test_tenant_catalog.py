"""The pure side of per-tenant journey maps: how a tenant's stored versions combine with the
shipped maps, and the field errors a broken map is reported with."""

from __future__ import annotations

from dataclasses import replace

import pytest

from services.core.journeys import JourneyCatalog, JourneyError, JourneyVersion, load_journeys, parse_journey
from services.core.settings import DEFAULT_JOURNEYS_DIR

SHIPPED = load_journeys(DEFAULT_JOURNEYS_DIR)
NEW = parse_journey({"id": "kiosk", "name": "Kiosk", "revenue_threshold": 10, "stages": [{"id": "a", "name": "A"}]})


def test_a_tenant_without_versions_has_the_shipped_maps_and_others_are_untouched():
    catalog = JourneyCatalog(SHIPPED)
    assert not catalog.loaded and catalog.of("t") is SHIPPED
    hotel = replace(SHIPPED["hotel"], revenue_threshold=1.0)
    catalog.replace([
        JourneyVersion("t", "hotel", 2, hotel),
        JourneyVersion("t", "airline", 1, None),  # retired
        JourneyVersion("t", "kiosk", 1, NEW),
    ])  # fmt: skip
    assert catalog.loaded
    mine = catalog.of("t")
    # Shipped order kept, the replaced map in place of the shipped one, the retired one gone,
    # the tenant's own journeys after the shipped ones.
    assert list(mine) == [*(j for j in SHIPPED if j != "airline"), "kiosk"]
    assert mine["hotel"].revenue_threshold == 1.0 and mine["kiosk"] is NEW
    assert catalog.of("someone-else") is SHIPPED and SHIPPED["hotel"].revenue_threshold != 1.0
    assert catalog.tenants_with_own_maps == ["t"]
    catalog.replace([])  # the versions are gone (a fresh database): back to the shipped maps
    assert catalog.of("t") is SHIPPED


def test_a_broken_map_names_every_wrong_field():
    document = {"id": "Bad Id", "revenue_threshold": -1, "stages": [{"id": "a", "name": "A", "promise": 12}]}
    with pytest.raises(JourneyError) as raised:
        parse_journey(document)
    paths = [path for path, _ in raised.value.problems]
    assert sorted(paths) == ["(root)", "id", "revenue_threshold", "stages.0.promise"]
    with pytest.raises(JourneyError) as raised:
        parse_journey({**document, "id": "ok", "name": "N", "revenue_threshold": 1,
                       "stages": [{"id": "a", "name": "A"}, {"id": "a", "name": "B"}]})  # fmt: skip
    assert raised.value.problems == [("stages", "duplicated stage ids: a; stage ids must be unique within a journey")]
