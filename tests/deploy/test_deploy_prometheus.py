"""Prometheus configuration, alerting rules and Alertmanager configuration, checked offline."""

from __future__ import annotations

import re

import pytest
import yaml
from deploy_support import (
    ALLOWED_METRICS,
    PROMETHEUS_DIR,
    RULE_TESTS,
    RULES,
    DEPLOY,
    assert_known_metrics,
    assert_promql_parses,
    find_tool,
    metric_names,
    run,
)

# The conditions the issue asks to alert on, each with the metric that shows it.
REQUIRED_ALERTS = {
    "CemIngestServerErrors": "cem_ingest_request_duration_seconds_count",
    "CemIngestEventsFailed": "cem_ingest_events_total",
    "CemIngestRejectedRatioHigh": "cem_ingest_events_total",
    "CemScoringLagHigh": "cem_scoring_lag_records",
    "CemEventToScoreSlow": "cem_event_to_score_seconds_bucket",
    "CemStageShortfallRatioHigh": "cem_stage_shortfall_ratio",
    "CemStageMeanGapLow": "cem_stage_mean_gap",
    "CemDeadLetterQueueGrowing": "cem_scoring_events_total",
    "CemDedupRetentionStalled": "cem_scoring_dedup_retention_last_run_timestamp_seconds",
    "CemServiceDown": "up",
}


def alerting_rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus.kubernetes.yml"])
def test_prometheus_config_is_valid(promtool, config):
    # Also checks the rule files the configuration loads.
    result = run([promtool, "check", "config", config], cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus.kubernetes.yml"])
def test_prometheus_scrapes_the_three_services_and_sends_to_alertmanager(config):
    loaded = yaml.safe_load((PROMETHEUS_DIR / config).read_text(encoding="utf-8"))
    jobs = {job["job_name"] for job in loaded["scrape_configs"]}
    assert {"cem-ingest", "cem-scoring", "cem-api"} <= jobs
    assert loaded["rule_files"] == ["rules/cem.rules.yml"]
    assert loaded["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]


def test_rules_are_valid(promtool):
    result = run([promtool, "check", "rules", str(RULES)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass(promtool):
    result = run([promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_required_condition_has_an_alert_on_its_metric():
    rules = {rule["alert"]: rule for rule in alerting_rules()}
    for alert, metric in REQUIRED_ALERTS.items():
        assert alert in rules, f"missing alert {alert}"
        assert metric in metric_names(rules[alert]["expr"]), f"{alert} does not use {metric}"


@pytest.mark.parametrize("rule", alerting_rules(), ids=lambda rule: rule["alert"])
def test_every_alert_says_how_bad_what_and_what_to_do(rule):
    assert rule["labels"]["severity"] in {"critical", "warning"}
    summary = rule["annotations"]["summary"].strip()
    runbook = rule["annotations"]["runbook"].strip()
    assert summary
    # One sentence: it ends with a full stop and no second sentence starts inside it.
    assert runbook.endswith("."), runbook
    assert not re.search(r"[.!?]\s+[A-Z]", runbook[:-1]), f"runbook is more than one sentence: {runbook}"


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    tests = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]
    firing, quiet = set(), set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in alerting_rules()}
    assert alerts - firing == set(), "alerts never shown to fire"
    assert alerts - quiet == set(), "alerts never shown to stay quiet"


def test_rule_expressions_use_only_known_metrics(promtool, tmp_path):
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    expressions = {
        f"{group['name']}/{rule.get('alert') or rule.get('record')}": rule["expr"]
        for group in groups
        for rule in group["rules"]
    }
    assert_promql_parses(promtool, expressions, tmp_path)
    assert_known_metrics(expressions)


def test_the_metric_contract_matches_the_services_metrics_module():
    """If services/core/metrics.py exists, it exports every metric the dashboards and
    rules read (a renamed metric would otherwise leave a panel silently empty)."""
    metrics_module = pytest.importorskip("services.core.metrics")
    from prometheus_client.metrics import MetricWrapperBase

    exported: set[str] = set()
    for value in vars(metrics_module).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.collect():
                if family.type == "counter":
                    exported.add(f"{family.name}_total")
                elif family.type == "histogram":
                    exported |= {f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count")}
                else:
                    exported.add(family.name)
    if not exported:
        pytest.skip("services.core.metrics defines no module-level metrics to compare with")
    missing = ALLOWED_METRICS - {"up"} - exported
    assert not missing, f"dashboards and rules read metrics that services.core.metrics does not define: {sorted(missing)}"


def test_alertmanager_config_is_valid():
    config = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text(encoding="utf-8"))
    receivers = {receiver["name"] for receiver in config["receivers"]}

    def routes(route):
        yield route
        for child in route.get("routes", []):
            yield from routes(child)

    assert all(route.get("receiver", "default") in receivers for route in routes(config["route"]))

    amtool = find_tool("amtool")
    if amtool is None:
        pytest.skip("amtool not installed (Debian: apt-get install prometheus-alertmanager); structure checked only")
    result = run([amtool, "check-config", str(DEPLOY / "alertmanager" / "alertmanager.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
