"""Revenue valued at query time: the SQL expression for lists and sums, and its Python twin.

`customers.revenue_sum` is a decayed sum kept at the reference time `last_event_at`; at a later
instant `now` it is worth revenue_sum * 2 ** ((last_event_at - now) / revenue_half_life), and
events in the future of `now` count at full value (CustomerState.revenue_at).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ColumnElement, Double, cast, extract, func, literal

from services.core.scoring import decay_factor, epoch_seconds

# Postgres raises on float underflow (2 ** -1075 == 0): clamp the exponent, which changes nothing
# anyone can see (2 ** -1000 of any revenue is 0 to the cent).
_MIN_EXPONENT = -1000.0


def revenue_at_sql(
    revenue_sum: ColumnElement, last_event_at: ColumnElement, now: datetime, half_life_s: float
) -> ColumnElement[float]:
    age_s = func.least(cast(extract("epoch", last_event_at - now), Double), literal(0.0, Double))
    exponent = func.greatest(age_s / literal(half_life_s, Double), literal(_MIN_EXPONENT, Double))
    return revenue_sum * func.power(literal(2.0, Double), exponent)


def revenue_at(revenue_sum: float, last_event_at: datetime, now: datetime, half_life_s: float) -> float:
    ref_s = epoch_seconds(last_event_at)
    return revenue_sum * decay_factor(ref_s, max(epoch_seconds(now), ref_s), half_life_s)
