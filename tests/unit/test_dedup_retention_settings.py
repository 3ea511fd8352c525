"""Settings of the processed_events retention and the retention period they give."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from services.core.settings import DAY_S, Settings
from services.scoring.retention import WINDOW_SLACK_S, dedup_retention_s


def test_defaults_keep_rows_37_days_plus_the_skew_and_slack():
    settings = Settings()
    assert (settings.dedup_retention_margin_days, settings.dedup_retention_interval_s) == (7.0, 300.0)
    assert settings.dedup_retention_batch_rows == 10_000
    assert dedup_retention_s(settings) == 37 * DAY_S + 300 + 120


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("CEM_DEDUP_RETENTION_MARGIN_DAYS", "14")
    monkeypatch.setenv("CEM_DEDUP_RETENTION_INTERVAL_S", "60")
    monkeypatch.setenv("CEM_DEDUP_RETENTION_BATCH_ROWS", "5000")
    settings = Settings()
    assert (settings.dedup_retention_margin_days, settings.dedup_retention_interval_s) == (14.0, 60.0)
    assert settings.dedup_retention_batch_rows == 5000


@pytest.mark.parametrize(
    "field, value",
    [
        ("dedup_retention_margin_days", 0),
        ("dedup_retention_margin_days", -1),
        ("dedup_retention_interval_s", 0),
        ("dedup_retention_batch_rows", 0),
        ("dedup_retention_batch_rows", 1_000_001),
    ],
)
def test_invalid_values_are_refused(field, value):
    with pytest.raises(ValidationError):
        Settings(**{field: value})


@given(
    age_days=st.floats(0.01, 3650),
    skew_s=st.floats(0, 86_400),
    margin_days=st.floats(0.01, 365),
)
def test_a_row_outlives_every_copy_scoring_would_accept(age_days, skew_s, margin_days):
    """A copy is accepted up to received_at - occurred_at <= max_age + 60 s, and occurred_at <=
    first received_at + skew + 60 s <= scored_at + skew + 60 s; it waits at most the topic's
    retention (<= margin) before it is consumed."""
    settings = Settings(max_event_age_days=age_days, max_future_skew_s=skew_s, dedup_retention_margin_days=margin_days)
    last_copy_consumed_after_scored_s = (skew_s + 60) + (settings.max_event_age_s + 60) + margin_days * DAY_S
    assert dedup_retention_s(settings) >= last_copy_consumed_after_scored_s
    assert WINDOW_SLACK_S == 120
