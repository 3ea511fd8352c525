"""FastAPI's own OpenTelemetry stays off unless the environment sets OpenTelemetry up."""

import os

import pytest

from services.core.http import fastapi_telemetry


def test_off_without_opentelemetry_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("FASTAPI_OTEL_AUTO_CONFIGURE", raising=False)
    assert fastapi_telemetry() == {"tracing": False, "metrics": False, "logs": False}


@pytest.mark.parametrize("variable", ["OTEL_EXPORTER_OTLP_ENDPOINT", "FASTAPI_OTEL_AUTO_CONFIGURE"])
def test_left_to_fastapi_when_configured(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    monkeypatch.setenv(variable, "1")
    assert fastapi_telemetry() is None


def test_every_service_passes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    test_off_without_opentelemetry_environment(monkeypatch)
    from services.api.app import create_app as api_app
    from services.core.settings import Settings
    from services.ingest.app import create_app as ingest_app
    from services.scoring.app import create_app as scoring_app

    for create_app in (api_app, ingest_app, scoring_app):
        app = create_app(Settings())
        # FastAPI keeps the option only privately: what it was given, over its defaults.
        configured = {kind: app._telemetry.get(kind) for kind in ("tracing", "metrics", "logs")}
        assert configured == fastapi_telemetry(), create_app.__module__
