"""deploy/docker-compose.yml: valid against the Compose Specification, and wired the way the
services need (no Docker engine is needed or used)."""

from __future__ import annotations

import json
import re
from importlib import resources

import pytest
import yaml
from deploy_support import COMPOSE_FILE, DEPLOY, PROMETHEUS_DIR
from jsonschema import Draft202012Validator

APP_SERVICES = {"ingest": 8001, "scoring": 8002, "api": 8000}
TOPICS = ("cem.touchpoints.v1", "cem.touchpoints.dlq.v1", "cem.alerts.v1")


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


def compose_spec_schema():
    # The Compose Specification's JSON schema as vendored by check-jsonschema (PyPI) for its
    # `--builtin-schema vendor.compose-spec`: offline, and updated with each release.
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(schema_file.read_text(encoding="utf-8"))


def test_compose_file_is_valid_against_the_compose_specification(compose):
    validator = Draft202012Validator(compose_spec_schema(), format_checker=Draft202012Validator.FORMAT_CHECKER)
    errors = [f"{'.'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(compose)]
    assert not errors, "\n".join(errors)


def test_the_schema_rejects_a_misspelt_key(compose):
    """The validation above is worth something: unknown keys are errors, not ignored."""
    broken = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    broken["services"]["scoring"]["replica"] = 2
    assert list(Draft202012Validator(compose_spec_schema()).iter_errors(broken))


def test_the_whole_stack_is_there(compose):
    assert set(compose["services"]) >= {
        "kafka", "kafka-topics", "postgres", "migrate", "ingest", "scoring", "api",
        "prometheus", "alertmanager", "grafana",
    }


def test_kafka_runs_in_kraft_mode_with_a_healthcheck(compose):
    kafka = compose["services"]["kafka"]
    assert kafka["image"] == "apache/kafka:3.9.0"
    environment = kafka["environment"]
    assert set(environment["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "KAFKA_ZOOKEEPER_CONNECT" not in environment
    # A KRaft cluster id is 16 bytes, base64 without padding.
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", environment["CLUSTER_ID"])
    assert kafka["healthcheck"]["test"]
    # The services connect to what the broker advertises.
    advertised = environment["KAFKA_ADVERTISED_LISTENERS"].split("://", 1)[1]
    assert compose["x-cem"]["environment"]["CEM_KAFKA_BOOTSTRAP_SERVERS"] == advertised


def test_topics_are_created_once_with_12_partitions(compose):
    topics = compose["services"]["kafka-topics"]
    script = " ".join(topics["command"])
    assert "--create --if-not-exists" in script and "--partitions 12" in script
    for topic in TOPICS:
        assert topic in script
    assert topics["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert topics["restart"] == "no"


def test_postgres_18_with_pg_isready(compose):
    postgres = compose["services"]["postgres"]
    assert postgres["image"].startswith("postgres:18")
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    # The services' URL matches the database the container creates.
    url = compose["x-cem"]["environment"]["CEM_DATABASE_URL"]
    environment = postgres["environment"]
    assert url == (
        f"postgresql+asyncpg://{environment['POSTGRES_USER']}:{environment['POSTGRES_PASSWORD']}"
        f"@postgres:5432/{environment['POSTGRES_DB']}"
    )


def test_migrate_is_a_one_shot_after_postgres(compose):
    migrate = compose["services"]["migrate"]
    assert migrate["command"] == ["migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_services_wait_for_migrations_and_topics(compose, name):
    service = compose["services"][name]
    assert service["command"] == [name]
    assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert service["depends_on"]["kafka-topics"]["condition"] == "service_completed_successfully"


@pytest.mark.parametrize("name,port", APP_SERVICES.items())
def test_services_are_healthy_only_when_ready(compose, name, port):
    test = compose["services"][name]["healthcheck"]["test"]
    # The slim image has no curl: Python's urllib, which raises (exit 1) on a 503.
    assert test[:3] == ["CMD", "python", "-c"]
    assert "urllib.request.urlopen" in test[3] and f"127.0.0.1:{port}/readyz" in test[3]


def test_scoring_runs_two_replicas_that_can_scale(compose):
    scoring = compose["services"]["scoring"]
    assert scoring["deploy"]["replicas"] == 2
    # A fixed name or host port would make a second replica impossible.
    assert "container_name" not in scoring and "ports" not in scoring


def test_the_cem_image_runs_with_the_container_settings(compose):
    environment = compose["x-cem"]["environment"]
    assert environment["CEM_PRODUCER_IDEMPOTENCE"] == "true"  # a real broker supports it
    assert environment["CEM_TOPIC_PARTITIONS"] == "12"
    assert compose["x-cem"]["build"]["context"] == ".."


def test_every_dependency_exists(compose):
    services = compose["services"]
    for name, service in services.items():
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown {dependency}"


def test_bind_mounts_exist_in_the_repository(compose):
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"


def test_prometheus_discovers_the_compose_services_on_their_ports(compose):
    scrape_configs = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())["scrape_configs"]
    jobs = {job["job_name"]: job for job in scrape_configs}
    for name, port in APP_SERVICES.items():
        (discovery,) = jobs[f"cem-{name}"]["dns_sd_configs"]
        assert discovery["names"] == [name] and discovery["port"] == port
        assert name in compose["services"]
    prometheus = compose["services"]["prometheus"]
    assert "./prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    alertmanager = compose["services"]["alertmanager"]
    assert "./alertmanager:/etc/alertmanager:ro" in alertmanager["volumes"]
