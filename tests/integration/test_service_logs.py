"""Each service run as `cem <service>`, the way production runs it, writes its log on stderr: one
JSON object per line. (uvicorn's own logging set-up used to close the handler installed before it,
and every service then logged nothing at all.)"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
import pytest

from services.core.embedded import free_port, wait_for_port
from services.core.kafka import ensure_topics
from services.core.settings import REPO_ROOT
from tests.conftest import make_settings
from tests.faults.support import service_env

pytestmark = pytest.mark.integration


def log_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def wait_for_line(path, wanted, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [line for line in log_lines(path) if wanted(line)]
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no such log line after {timeout_s} s:\n{path.read_text()[-3000:]}")


@pytest.mark.parametrize("service", ["ingest", "api", "scoring"])
async def test_a_service_started_from_the_command_line_writes_json_log_lines(postgres, kafka, tmp_path, service):
    settings = make_settings(postgres, kafka)
    await ensure_topics(settings)
    port = free_port()
    env = service_env(settings, **{f"CEM_{service.upper()}_PORT": str(port), "CEM_LOG_FORMAT": "json"})
    log_path = tmp_path / f"{service}.log"
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", service], env=env, cwd=REPO_ROOT, stdout=log_file, stderr=log_file
        )
    try:
        if service == "scoring":
            # Each of the process's consumers says which partitions it resumed, and from where.
            line = wait_for_line(log_path, lambda line: "resumed" in line["message"])
            assert line["name"] == "cem.scoring" and line["level"] == "INFO"
            assert line["message"].startswith("consumer-")
        else:
            wait_for_port(port, 30, process)
            response = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
            line = wait_for_line(log_path, lambda line: line["name"] == "cem.access")
            assert (line["route"], line["status"]) == ("/readyz", response.status_code)
    finally:
        process.send_signal(signal.SIGTERM)
        exit_code = process.wait(40)
    # uvicorn re-raises SIGTERM after its graceful shutdown; scoring turns it into an exit code that
    # says whether its consumers committed their last batches.
    assert exit_code == (0 if service == "scoring" else -signal.SIGTERM), log_path.read_text()[-3000:]
