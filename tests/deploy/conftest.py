"""Fixtures of the offline deployment checks (tests/deploy)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# The helpers live in deploy_support.py beside this file: a unique module name, importable
# from the test modules whatever pytest's import mode and whatever other conftest.py exist.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from deploy_support import find_tool  # noqa: E402


@pytest.fixture(scope="session")
def promtool() -> str:
    """promtool, or a failure saying how to get it: these checks must not silently vanish."""
    path = find_tool("promtool")
    if path is None:
        if os.environ.get("CEM_SKIP_PROMTOOL") == "1":
            pytest.skip("promtool is not installed and CEM_SKIP_PROMTOOL=1")
        pytest.fail(
            "promtool is not installed: `apt-get install -y prometheus` (Debian) provides it; "
            "set CEM_SKIP_PROMTOOL=1 to skip the Prometheus checks on purpose",
            pytrace=False,
        )
    return path
