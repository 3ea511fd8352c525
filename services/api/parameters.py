"""Query parameters with rules of their own: windows, steps, orders, limits and page cursors.

Pure: each parser returns the value or raises InvalidParameter naming the parameter and saying
what is allowed, so every endpoint refuses bad input with the same words.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

import orjson

from services.api.errors import InvalidParameter
from services.core.scoring import QUADRANTS

WINDOWS = ("5m", "1h", "24h", "7d", "30d")
MAX_WINDOW = timedelta(days=30)
MIN_STEP = timedelta(minutes=1)
MAX_STEPS = 1000
NICE_STEPS = ("1m", "5m", "15m", "1h", "6h", "1d")
DEFAULT_STEPS = 60  # the default step is the smallest nice step with at most this many steps

_DURATION = re.compile(r"([1-9][0-9]{0,5})([mhd])")
_UNIT = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1)}

WINDOW_ALLOWED = "5m, 1h, 24h, 7d, 30d, or any <n>m, <n>h or <n>d from 1m up to 30d"


def _duration(value: str) -> timedelta | None:
    match = _DURATION.fullmatch(value)
    return None if match is None else int(match.group(1)) * _UNIT[match.group(2)]


def parse_window(value: str) -> timedelta:
    window = _duration(value)
    if window is None or window > MAX_WINDOW:
        raise InvalidParameter("window", f"invalid window '{value}'; allowed: {WINDOW_ALLOWED}", list(WINDOWS))
    return window


def steps_in(window: timedelta, step: timedelta) -> int:
    return math.ceil(window / step)


def parse_step(value: str | None, window: timedelta) -> timedelta:
    """The series step: >= 1m, <= the window, at most MAX_STEPS of them; by default a round step
    giving at most DEFAULT_STEPS points."""
    if value is None:
        nice = [_duration(candidate) for candidate in NICE_STEPS]
        return next((step for step in nice if steps_in(window, step) <= DEFAULT_STEPS), nice[-1])
    step = _duration(value)
    smallest = max(MIN_STEP, window / MAX_STEPS)
    allowed = f"<n>m, <n>h or <n>d from {format_duration(smallest)} (at most {MAX_STEPS} steps) up to the window"
    if step is None or step < MIN_STEP or step > window or steps_in(window, step) > MAX_STEPS:
        message = f"invalid step '{value}' for a window of {format_duration(window)}; allowed: {allowed}"
        raise InvalidParameter("step", message, allowed)
    return step


def format_duration(duration: timedelta) -> str:
    """The shortest <n>m|h|d spelling of a duration (rounded up to whole minutes)."""
    minutes = math.ceil(duration.total_seconds() / 60)
    if minutes % 1440 == 0:
        return f"{minutes // 1440}d"
    if minutes % 60 == 0:
        return f"{minutes // 60}h"
    return f"{minutes}m"


def parse_quadrant(value: str | None) -> str | None:
    if value is not None and value not in QUADRANTS:
        raise InvalidParameter(
            "quadrant", f"unknown quadrant '{value}'; allowed: {', '.join(QUADRANTS)}", list(QUADRANTS)
        )
    return value


def parse_limit(value: int, maximum: int) -> int:
    if not 1 <= value <= maximum:
        raise InvalidParameter("limit", f"limit must be from 1 to {maximum}, got {value}", f"1-{maximum}")
    return value


def parse_choices(field: str, value: str | None, allowed: tuple[str, ...]) -> list[str] | None:
    """A filter of one value or several, comma-separated (`status=open,acknowledged`)."""
    if value is None:
        return None
    chosen = [part.strip() for part in value.split(",")]
    unknown = [part for part in chosen if part not in allowed]
    if unknown or not chosen:
        message = f"unknown {field} '{', '.join(unknown) or value}'; allowed: {', '.join(allowed)} (comma-separated)"
        raise InvalidParameter(field, message, list(allowed))
    return chosen


# --------------------------------------------------------------------------------------------
# List orders and their keyset cursor.

ORDER_FIELDS = ("revenue", "experience_index", "last_event_at")
ORDERS = tuple(f"{sign}{field}" for field in ORDER_FIELDS for sign in ("-", ""))
TIMESTAMP_ORDER_FIELDS = frozenset({"last_event_at", "opened_at", "updated_at"})


@dataclass(frozen=True)
class Order:
    field: str  # one of ORDER_FIELDS
    descending: bool

    @property
    def text(self) -> str:
        return ("-" if self.descending else "") + self.field


def parse_order(value: str, allowed: tuple[str, ...] = ORDERS) -> Order:
    """An order of `allowed` (the customer list's by default)."""
    if value not in allowed:
        message = f"unknown order '{value}'; allowed: {', '.join(allowed)} ('-' sorts descending)"
        raise InvalidParameter("order", message, list(allowed))
    return Order(field=value.lstrip("-"), descending=value.startswith("-"))


@dataclass(frozen=True)
class Cursor:
    """Where a page ended: the last row's sort key and id (the tie-break), under the order it was
    issued for."""

    order: str
    key: float | datetime
    id: str


def encode_cursor(cursor: Cursor) -> str:
    key = cursor.key.isoformat() if isinstance(cursor.key, datetime) else cursor.key
    payload = orjson.dumps({"order": cursor.order, "key": key, "id": cursor.id})
    return base64.urlsafe_b64encode(payload).rstrip(b"=").decode("ascii")


def decode_cursor(value: str, order: Order) -> Cursor:
    def invalid(why: str) -> InvalidParameter:
        message = f"invalid cursor: {why}; pass the next_cursor of the previous page unchanged, or no cursor"
        return InvalidParameter("cursor", message, "a next_cursor returned by this endpoint")

    try:
        payload = orjson.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
        cursor_order, key, row_id = payload["order"], payload["key"], payload["id"]
    except (binascii.Error, ValueError, TypeError, KeyError) as error:
        raise invalid("not one this API issued") from error
    if cursor_order != order.text:
        raise invalid(f"it was issued for order={cursor_order}, not order={order.text}")
    if not isinstance(row_id, str):
        raise invalid("not one this API issued")
    try:
        if order.field in TIMESTAMP_ORDER_FIELDS:
            key = datetime.fromisoformat(key)
            if key.tzinfo is None:
                raise ValueError("naive timestamp")
        elif isinstance(key, bool) or not isinstance(key, (int, float)):
            raise TypeError("not a number")
        else:
            key = float(key)
    except (TypeError, ValueError) as error:
        raise invalid("not one this API issued") from error
    return Cursor(order=cursor_order, key=key, id=row_id)
