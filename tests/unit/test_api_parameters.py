"""The query API's parameter rules and its SVG drawing, without a server."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.api.errors import InvalidParameter
from services.api.parameters import (
    Cursor,
    decode_cursor,
    encode_cursor,
    format_duration,
    parse_limit,
    parse_order,
    parse_step,
    parse_window,
)
from services.api.svg import Bubble, render_positioning_map


@pytest.mark.parametrize(
    "text, minutes", [("5m", 5), ("1h", 60), ("24h", 1440), ("7d", 10080), ("30d", 43200), ("720h", 43200)]
)
def test_windows_up_to_thirty_days_are_accepted(text, minutes):
    assert parse_window(text) == timedelta(minutes=minutes)


@pytest.mark.parametrize("text", ["0m", "31d", "43201m", "1w", "1.5h", "h", "01h", " 1h", "1h ", "1h\n", "-5m"])
def test_other_windows_are_refused_naming_the_parameter(text):
    with pytest.raises(InvalidParameter) as raised:
        parse_window(text)
    assert raised.value.errors[0]["field"] == "window"
    assert raised.value.errors[0]["allowed"] == ["5m", "1h", "24h", "7d", "30d"]


def test_steps_are_at_least_a_minute_at_most_the_window_and_at_most_a_thousand():
    day = timedelta(days=1)
    assert parse_step("1h", day) == timedelta(hours=1)
    assert parse_step("2m", day) == timedelta(minutes=2)  # 720 steps
    assert parse_step("1d", day) == day
    for step in ("1m", "2d", "30s", "x"):  # 1440 steps, longer than the window, below a minute, garbage
        with pytest.raises(InvalidParameter, match="step"):
            parse_step(step, day)


@pytest.mark.parametrize(
    "window, step", [("5m", "1m"), ("1h", "1m"), ("24h", "1h"), ("7d", "6h"), ("30d", "1d"), ("3h", "5m")]
)
def test_the_default_step_is_round_and_gives_at_most_sixty_points(window, step):
    assert format_duration(parse_step(None, parse_window(window))) == step


def test_limits_outside_one_to_the_maximum_are_refused():
    assert parse_limit(500, 500) == 500
    with pytest.raises(InvalidParameter, match="from 1 to 500"):
        parse_limit(0, 500)


keys = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.datetimes(timezones=st.just(timezone.utc), min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1)),
)


@given(key=keys, customer_id=st.text(min_size=1, max_size=128))
def test_a_cursor_decodes_to_the_key_it_was_made_of(key, customer_id):
    order = parse_order("-last_event_at" if isinstance(key, datetime) else "revenue")
    cursor = Cursor(order=order.text, key=key, id=customer_id)
    token = encode_cursor(cursor)
    assert token.isascii() and "=" not in token and "/" not in token and "+" not in token
    assert decode_cursor(token, order) == cursor


def test_a_cursor_is_only_good_for_the_order_it_was_issued_for():
    token = encode_cursor(Cursor(order="-revenue", key=1.5, id="c"))
    with pytest.raises(InvalidParameter, match="issued for order=-revenue"):
        decode_cursor(token, parse_order("experience_index"))
    mismatched = encode_cursor(Cursor(order="-last_event_at", key=1.5, id="c"))  # a number for a time
    with pytest.raises(InvalidParameter, match="not one this API issued"):
        decode_cursor(mismatched, parse_order("-last_event_at"))


def test_the_picture_is_well_formed_and_bubble_areas_follow_revenue():
    bubbles = [Bubble("exemplary", 3, 4000.0), Bubble("growth", 10, 1000.0), Bubble("at_risk", 1, 0.0),
               Bubble("disengaged", 0, 0.0)]  # fmt: skip
    picture = render_positioning_map(bubbles, "A & <B>", datetime(2026, 1, 1, tzinfo=timezone.utc), "USD")
    root = ElementTree.fromstring(picture.encode())
    radii = [float(circle.get("r")) for circle in root.iter("{http://www.w3.org/2000/svg}circle")]
    assert len(radii) == 2 and radii[0] == pytest.approx(2 * radii[1], rel=0.01)  # 4x the revenue, 2x the radius
    texts = [element.text for element in root.iter("{http://www.w3.org/2000/svg}text")]
    assert "A & <B>" in texts and "1 customer" in texts and "USD 4,000" in texts
