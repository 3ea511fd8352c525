"""A real Prometheus (Debian's package) scrapes the three services while events flow, and
finds, through its HTTP API, every series that the alerting rules and the dashboards query."""

from __future__ import annotations

import asyncio
import json
import subprocess
import tempfile
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
import yaml

from services.core.embedded import free_port, wait_for_port
from tests.deploy.deploy_support import GRAFANA_DIR, RULES, find_tool, metric_names, substitute_grafana_variables
from tests.faults.support import service_process

pytestmark = pytest.mark.integration


# Which process must export which metric (names as queried by the rules and dashboards).
OWNERS = {"cem_ingest_": "cem-ingest", "cem_api_": "cem-api"}


def owner_of(metric: str) -> str:
    return next((job for prefix, job in OWNERS.items() if metric.startswith(prefix)), "cem-scoring")


def queried_metric_names() -> set[str]:
    expressions = [rule["expr"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    for path in (GRAFANA_DIR / "dashboards").glob("*.json"):
        panels = json.loads(path.read_text())["panels"]
        expressions += [target["expr"] for panel in panels for target in panel.get("targets", []) if target.get("expr")]
    names: set[str] = set()
    for expression in expressions:
        names |= {name for name in metric_names(substitute_grafana_variables(expression)) if name}
    return names


async def test_prometheus_scrapes_every_series_the_rules_and_dashboards_use(settings):
    prometheus = find_tool("prometheus")
    if prometheus is None:
        pytest.fail("the prometheus binary is missing: apt-get install prometheus (Debian)")
    ports = {name: free_port() for name in ("ingest", "api", "scoring", "prometheus")}
    with ExitStack() as stack:
        # Loopback: the test posts as CEM_TENANT without a key.
        env = {"CEM_AUTH_DISABLED": "true", "CEM_METRICS_REFRESH_S": "1"}
        ingest_url, api_url, _ = (
            stack.enter_context(service_process(name, settings, ports[name], **env))
            for name in ("ingest", "api", "scoring")
        )

        workdir = Path(tempfile.mkdtemp(prefix="cem-prometheus-"))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": f"cem-{name}", "static_configs": [{"targets": [f"127.0.0.1:{ports[name]}"]}]}
                for name in ("ingest", "api", "scoring")
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        process = subprocess.Popen(
            [
                prometheus, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{ports['prometheus']}", "--log.level=warn",
            ],  # fmt: skip
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        stack.callback(process.wait, 20)
        stack.callback(process.terminate)
        wait_for_port(ports["prometheus"], 30, process)

        async with httpx.AsyncClient(timeout=10) as client:
            deadline = asyncio.get_running_loop().time() + 30
            while (await client.get(f"{ingest_url}/readyz")).status_code != 200:
                assert asyncio.get_running_loop().time() < deadline, "ingest never became ready"
                await asyncio.sleep(0.2)
            now = datetime.now(timezone.utc).isoformat()
            events = [
                {"event_id": f"scrape-{n}", "occurred_at": now, "customer_id": f"c{n % 7}", "journey": "car-rental",
                 "stage": "pickup", "experience": n % 10, "revenue": 400}
                for n in range(60)
            ]  # fmt: skip
            events.append({**events[0], "event_id": "scrape-bad", "stage": "nowhere"})
            response = await client.post(f"{ingest_url}/v1/events:batch", json={"events": events})
            assert response.status_code == 202
            for path in ("/v1/customers/c1", "/v1/journeys/car-rental/stages?window=1h", "/v1/customers/nobody"):
                await client.get(f"{api_url}{path}")

            wanted = {(name, owner_of(name)) for name in queried_metric_names() if name != "up"}
            base = f"http://127.0.0.1:{ports['prometheus']}/api/v1"
            found: set[tuple[str, str]] = set()
            deadline = asyncio.get_running_loop().time() + 60
            while asyncio.get_running_loop().time() < deadline:
                result = (
                    await client.get(f"{base}/query", params={"query": 'count by (__name__, job) ({__name__=~"cem_.+"})'})
                ).json()["data"]["result"]
                found = {(series["metric"]["__name__"], series["metric"]["job"]) for series in result}
                if wanted <= found:
                    break
                await asyncio.sleep(1.0)
            assert wanted <= found, f"series never scraped from their service: {sorted(wanted - found)}"
            targets = (await client.get(f"{base}/targets")).json()["data"]["activeTargets"]
            assert {target["labels"]["job"]: target["health"] for target in targets} == {
                "cem-ingest": "up", "cem-api": "up", "cem-scoring": "up",
            }  # fmt: skip
            rules = (await client.get(f"{base}/rules")).json()["data"]["groups"]
            assert all(rule["health"] == "ok" for group in rules for rule in group["rules"])
