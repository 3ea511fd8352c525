"""deploy/kubernetes: every manifest valid against the Kubernetes JSON schemas (strict, from
the kubernetes-validate package, offline), the kustomization renders, and the pieces fit."""

from __future__ import annotations

import sys

import kubernetes_validate
import pytest
import yaml
from deploy_support import (
    KUBERNETES_DIR,
    KUBERNETES_VERSION,
    PROMETHEUS_DIR,
    REPO_ROOT,
    find_tool,
    load_yaml_documents,
    run,
)

SERVICES = {"ingest": 8001, "scoring": 8002, "api": 8000}
TEMPLATES = {"secret.example.yaml"}  # shipped, validated, deliberately not applied
PARTITIONS = 12


def kustomization():
    return yaml.safe_load((KUBERNETES_DIR / "kustomization.yaml").read_text(encoding="utf-8"))


def manifests():
    """(file, document) for every resource the kustomization applies, plus the templates."""
    files = list(kustomization()["resources"]) + sorted(TEMPLATES)
    return [(name, doc) for name in files for doc in load_yaml_documents(KUBERNETES_DIR / name)]


def applied(kind):
    return {
        doc["metadata"]["name"]: doc
        for name, doc in manifests()
        if doc["kind"] == kind and name not in TEMPLATES
    }


def containers(name):
    return applied("Deployment")[f"cem-{name}"]["spec"]["template"]["spec"]["containers"]


def resource_id(item):
    name, doc = item
    return f"{name}:{doc['kind']}/{doc['metadata']['name']}"


@pytest.mark.parametrize("item", manifests(), ids=resource_id)
def test_manifest_is_valid_against_the_kubernetes_schema(item):
    _, doc = item
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(part) for part in error.path)
        pytest.fail(f"{path}: {error.message}", pytrace=False)


def test_kustomization_lists_every_manifest():
    listed = set(kustomization()["resources"])
    on_disk = {path.name for path in KUBERNETES_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk - TEMPLATES
    assert kustomization()["namespace"] == "cem"


def test_kustomization_renders_to_valid_resources():
    kubectl = find_tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: each file is still validated on its own above")
    result = run([kubectl, "kustomize", str(KUBERNETES_DIR)])
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert len(rendered) == sum(1 for name, _ in manifests() if name not in TEMPLATES)
    for doc in rendered:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "cem"


def test_journeys_configmap_is_up_to_date_with_schemas_journeys():
    result = run([sys.executable, str(KUBERNETES_DIR / "journeys_configmap.py"), "--check"])
    assert result.returncode == 0, result.stderr
    data = applied("ConfigMap")["cem-journeys"]["data"]
    assert set(data) == {path.name for path in (REPO_ROOT / "schemas" / "journeys").glob("*.yaml")}


@pytest.mark.parametrize("name,port", SERVICES.items())
def test_deployment_probes_health_and_readiness(name, port):
    (container,) = containers(name)
    ports = {entry["name"]: entry["containerPort"] for entry in container["ports"]}
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        http = container[probe]["httpGet"]
        assert http["path"] == path, probe
        assert ports[http["port"]] == port, probe


@pytest.mark.parametrize("name", SERVICES)
def test_deployment_runs_the_service_locked_down(name):
    pod = applied("Deployment")[f"cem-{name}"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"].split(":")[0] == "cem-touchpoints"
    assert container["args"] == [name]
    resources = container["resources"]
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[bound]), bound
    assert pod["securityContext"]["runAsNonRoot"] is True
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # A read-only root still needs a writable /tmp.
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
    assert "/tmp" in mounts


@pytest.mark.parametrize("name", SERVICES)
def test_deployment_reads_config_journeys_and_only_needed_secrets(name):
    (container,) = containers(name)
    config = applied("ConfigMap")["cem-config"]["data"]
    assert config["CEM_HOST"] == "0.0.0.0"
    assert {"configMapRef": {"name": "cem-config"}} in container["envFrom"]
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert mounts["journeys"] == config["CEM_JOURNEYS_DIR"]
    secret_env = [env for env in container.get("env", []) if "valueFrom" in env]
    # Every service reads Postgres: scoring and the API their data, ingest the API keys.
    assert [env["name"] for env in secret_env] == ["CEM_DATABASE_URL"]
    template = load_yaml_documents(KUBERNETES_DIR / "secret.example.yaml")[0]
    for env in secret_env:
        reference = env["valueFrom"]["secretKeyRef"]
        assert reference["name"] == template["metadata"]["name"]
        assert reference["key"] in template["stringData"]


def test_ingest_and_api_autoscale_and_scoring_is_bounded_by_partitions():
    autoscalers = applied("HorizontalPodAutoscaler")
    deployments = applied("Deployment")
    assert {hpa["spec"]["scaleTargetRef"]["name"] for hpa in autoscalers.values()} == {"cem-ingest", "cem-api"}
    for hpa in autoscalers.values():
        assert hpa["apiVersion"] == "autoscaling/v2"
        target = deployments[hpa["spec"]["scaleTargetRef"]["name"]]
        # A replicas field would fight the autoscaler at every apply.
        assert "replicas" not in target["spec"]
        assert 1 < hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    config = applied("ConfigMap")["cem-config"]["data"]
    assert int(config["CEM_TOPIC_PARTITIONS"]) == PARTITIONS
    assert 1 <= deployments["cem-scoring"]["spec"]["replicas"] <= PARTITIONS


def test_every_deployment_has_a_disruption_budget_that_selects_it():
    budgets = applied("PodDisruptionBudget")
    for name, deployment in applied("Deployment").items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        budget = budgets[name]
        assert budget["apiVersion"] == "policy/v1"
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_services_select_their_pods_and_named_ports():
    services = applied("Service")
    assert {"cem-ingest", "cem-api", "cem-scoring-metrics"} <= set(services)
    deployments = applied("Deployment")
    for service in services.values():
        selector = service["spec"]["selector"]
        (deployment,) = [
            d for d in deployments.values() if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        port_names = {port["name"] for port in container["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names


def test_prometheus_kubernetes_config_discovers_the_headless_metrics_services():
    scrape_configs = yaml.safe_load((PROMETHEUS_DIR / "prometheus.kubernetes.yml").read_text())["scrape_configs"]
    services = applied("Service")
    for job in scrape_configs:
        (discovery,) = job["dns_sd_configs"]
        (host,) = discovery["names"]
        service_name, namespace = host.split(".")[:2]
        assert namespace == "cem"
        service = services[service_name]
        # Headless, with not-ready pods listed: one target per pod, down ones included.
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["publishNotReadyAddresses"] is True
        assert discovery["port"] in {port["port"] for port in service["spec"]["ports"]}
        assert job["job_name"] == f"cem-{service_name.removeprefix('cem-').removesuffix('-metrics')}"


def test_jobs_migrate_and_create_the_topics():
    jobs = applied("Job")
    (migrate,) = jobs["cem-migrate"]["spec"]["template"]["spec"]["containers"]
    assert migrate["args"] == ["migrate"]
    (topics,) = jobs["cem-kafka-topics"]["spec"]["template"]["spec"]["containers"]
    script = " ".join(topics["args"])
    for topic in ("cem.touchpoints.v1", "cem.touchpoints.dlq.v1", "cem.alerts.v1"):
        assert topic in script
    assert "--if-not-exists" in script and "CEM_TOPIC_PARTITIONS" in script
    for job in jobs.values():
        # Finished Jobs delete themselves, so the next apply can run them again.
        assert job["spec"]["ttlSecondsAfterFinished"] > 0
        assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
