"""The embedded Postgres's shared_buffers: a quarter of the memory, within [128 MB, 1 GB]."""

from __future__ import annotations

import pytest

from services.core import embedded


@pytest.mark.parametrize(
    ("memory_mb", "expected_mb"),
    [(256, 128), (1024, 256), (2048, 512), (4096, 1024), (24 * 1024, 1024)],
)
def test_shared_buffers_is_a_quarter_of_memory_capped(monkeypatch, memory_mb: int, expected_mb: int) -> None:
    values = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": memory_mb * 2**20 // 4096}
    monkeypatch.setattr(embedded.os, "sysconf", values.__getitem__)
    assert embedded.shared_buffers_mb() == expected_mb
