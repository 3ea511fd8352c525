"""Grafana provisioning and dashboards: valid models whose every query parses and reads
only the metrics the services export."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from deploy_support import (
    COMPOSE_FILE,
    GRAFANA_DIR,
    assert_known_metrics,
    assert_promql_parses,
    metric_names,
    substitute_grafana_variables,
)

DASHBOARD_FILES = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))

# What each dashboard must show, as the metrics that show it.
REQUIRED_METRICS = {
    "cem-cx-overview.json": {
        "cem_stage_mean_gap",
        "cem_stage_shortfall_ratio",
        "cem_customers",
        "cem_revenue",
        "cem_alerts_open",
    },
    "cem-ops.json": {
        "cem_ingest_events_total",  # rate, errors, rejections, DLQ via scoring below
        "cem_ingest_request_duration_seconds_bucket",
        "cem_ingest_produce_duration_seconds_bucket",
        "cem_scoring_events_total",
        "cem_scoring_lag_records",
        "cem_event_to_score_seconds_bucket",  # freshness
        "cem_api_request_duration_seconds_bucket",
    },
}


def load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def all_panels(dashboard):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside collapsed rows


def expressions(dashboard, name):
    """Every PromQL query of a dashboard, panels and template variables, by where it is."""
    found = {}
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            found[f"{name} panel {panel['id']} '{panel['title']}' {target['refId']}"] = target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            # label_values(selector, label): the selector is PromQL.
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query.strip())
            assert match, f"{name}: variable {variable['name']} is not a label_values() query"
            found[f"{name} variable {variable['name']}"] = match.group(1)
    return found


def test_both_dashboards_are_shipped():
    assert {path.name for path in DASHBOARD_FILES} == set(REQUIRED_METRICS)


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda path: path.name)
def test_dashboard_is_a_well_formed_grafana_model(path):
    dashboard = load(path)
    assert dashboard["uid"] == path.stem
    assert dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = list(all_panels(dashboard))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"panel {panel['title']} overflows the 24-column grid"


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda path: path.name)
def test_panels_do_not_overlap(path):
    cells = {}
    for panel in all_panels(load(path)):
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"'{panel['title']}' overlaps '{cells[(x, y)]}'"
                cells[(x, y)] = panel["title"]


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda path: path.name)
def test_every_query_uses_the_templated_datasource(path):
    dashboard = load(path)
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    templated = {"type": "prometheus", "uid": "${datasource}"}
    for panel in all_panels(dashboard):
        if panel.get("targets"):
            assert panel["datasource"] == templated, panel["title"]
            for target in panel["targets"]:
                assert target["datasource"] == templated, panel["title"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == templated


def test_cx_overview_is_driven_by_a_journey_variable():
    dashboard = load(GRAFANA_DIR / "dashboards" / "cem-cx-overview.json")
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert "cem_stage_mean_gap" in variables["journey"]["query"]["query"]
    assert {option["value"] for option in variables["window"]["options"]} == {"5m", "1h", "24h"}
    stage_metrics = {"cem_stage_mean_gap", "cem_stage_shortfall_ratio"}
    stage_queries = [
        target["expr"]
        for panel in all_panels(dashboard)
        for target in panel.get("targets", [])
        if metric_names(substitute_grafana_variables(target["expr"])) & stage_metrics
    ]
    assert stage_queries
    for expr in stage_queries:
        assert 'journey="$journey"' in expr and 'window="$window"' in expr, expr


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda path: path.name)
def test_every_query_parses_and_reads_only_known_metrics(promtool, tmp_path, path):
    found = {
        source: substitute_grafana_variables(expr) for source, expr in expressions(load(path), path.name).items()
    }
    assert found
    assert_promql_parses(promtool, found, tmp_path)
    assert_known_metrics(found)
    used = set().union(*(metric_names(expr) for expr in found.values()))
    assert REQUIRED_METRICS[path.name] <= used, f"not shown: {REQUIRED_METRICS[path.name] - used}"


def test_provisioning_points_at_the_compose_prometheus_and_dashboards():
    datasources = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (datasource,) = datasources["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"

    providers = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "cem.yml").read_text())
    (provider,) = providers["providers"]

    grafana = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
