"""Helpers of the offline deployment checks: paths, the metric contract, PromQL checks."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
RULES = PROMETHEUS_DIR / "rules" / "cem.rules.yml"
RULE_TESTS = PROMETHEUS_DIR / "rules" / "cem.rules.test.yml"
GRAFANA_DIR = DEPLOY / "grafana"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
KUBERNETES_DIR = DEPLOY / "kubernetes"

# The metrics of SPEC 8 ("at least") and our additions, by type: the only names a dashboard or a
# rule may query (test_the_metric_contract_matches_the_services_metrics_module checks that the
# services export each).
HISTOGRAMS = {
    "cem_ingest_request_duration_seconds",
    "cem_ingest_produce_duration_seconds",
    "cem_scoring_batch_duration_seconds",
    "cem_event_to_score_seconds",
    "cem_api_request_duration_seconds",
    "cem_event_loop_lag_seconds",  # every service: how late its event loop runs a timer
}
COUNTERS = {
    "cem_ingest_events", "cem_scoring_events", "cem_alert_transitions", "cem_scoring_dedup_rows_deleted",
    "cem_log_lines_dropped",  # every service: log lines dropped while stderr did not drain
}  # fmt: skip
GAUGES = {
    "cem_scoring_lag_records",
    "cem_stage_mean_gap",
    "cem_stage_shortfall_ratio",
    "cem_customers",
    "cem_revenue",
    "cem_alerts_open",
    "cem_scoring_dedup_retention_last_run_timestamp_seconds",
}
ALLOWED_METRICS = (
    GAUGES
    | {f"{name}_total" for name in COUNTERS}
    | {f"{name}{suffix}" for name in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
    | {"up"}  # Prometheus' own per-target health series
)

# Kubernetes version the manifests are validated against (kubernetes-validate's schemas).
KUBERNETES_VERSION = "1.30"


def load_yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def find_tool(name: str) -> str | None:
    """A command on PATH, or beside this Python (a venv's bin/ when it is not activated)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else None


def run(command: list[str], cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


# ---- PromQL ---------------------------------------------------------------------------

_GRAFANA_BUILTIN = re.compile(r"\$__\w+")
_GRAFANA_VARIABLE = re.compile(r"\$\{\w+(?::\w+)?\}|\$\w+")


def substitute_grafana_variables(expr: str) -> str:
    """Turn a Grafana query into plain PromQL: $__rate_interval and friends are durations,
    every other variable ($journey, ${window}) stands inside a label value here."""
    return _GRAFANA_VARIABLE.sub("x", _GRAFANA_BUILTIN.sub("5m", expr))


def metric_names(expr: str) -> set[str | None]:
    """The metric names an expression selects (None for a selector without a name)."""
    import promql_parser

    names: set[str | None] = set()

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), pre_visit=visit)
    return names


def assert_promql_parses(promtool: str, expressions: dict[str, str], tmp_path: Path) -> None:
    """Parse every expression with Prometheus' own parser: each becomes a recording rule in
    a scratch rules file, which `promtool check rules` parses. One group per expression, so
    a failure names where the expression came from."""
    groups = [
        {"name": source, "rules": [{"record": f"deploy_check:expression_{index}", "expr": expr}]}
        for index, (source, expr) in enumerate(expressions.items())
    ]
    rules_file = tmp_path / "expressions.rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False), encoding="utf-8")
    result = run([promtool, "check", "rules", str(rules_file)])
    assert result.returncode == 0, f"promtool cannot parse:\n{result.stdout}\n{result.stderr}"


def assert_known_metrics(expressions: dict[str, str]) -> None:
    unknown = {
        source: sorted(str(name) for name in metric_names(expr) - ALLOWED_METRICS)
        for source, expr in expressions.items()
        if metric_names(expr) - ALLOWED_METRICS
    }
    assert not unknown, (
        f"expressions select metrics outside SPEC 8 (or without a name): {unknown}; "
        f"known: {sorted(ALLOWED_METRICS)}"
    )
