"""Revenue valued at query time: one customer's, and the positioning map's totals per band.

`customers.revenue_sum` is a decayed sum kept at the reference time `last_event_at`; at a later
instant `now` it is worth revenue_sum * 2 ** ((last_event_at - now) / revenue_half_life), and
events in the future of `now` count at full value (CustomerState.revenue_at).

`quadrant_totals` (migration 0007) keeps the revenue of many customers in a time-invariant form:
each customer adds round(2 ** (revenue_rank - 16 * band + 46)) to the band floor(revenue_rank / 16),
where revenue_rank = log2(revenue_sum) + last_event_at / half_life, so a band is worth
revenue_units * 2 ** (16 * band - 46 - now / half_life): the customers' revenue decayed to `now`,
also for a customer whose last event is after `now` (whose revenue then counts above its full
value: `future_overcount` is what to take back). Experience indexes are summed as
round(index * 2 ** 40).
"""

from __future__ import annotations

from datetime import datetime

from services.core.scoring import decay_factor, epoch_seconds

# The fixed point of quadrant_totals (frozen in migration 0007): a revenue band spans 2 ** 16, a
# customer's revenue is counted in units of 2 ** -46 of its band's bottom, an index in 2 ** -40.
REVENUE_BAND_BITS = 16
REVENUE_UNIT_BITS = 46
INDEX_UNIT_BITS = 40


def revenue_at(revenue_sum: float, last_event_at: datetime, now: datetime, half_life_s: float) -> float:
    ref_s = epoch_seconds(last_event_at)
    return revenue_sum * decay_factor(ref_s, max(epoch_seconds(now), ref_s), half_life_s)


def band_revenue_at(revenue_units: float, band: int, now_s: float, half_life_s: float) -> float:
    """The worth at now_s of a quadrant_totals band (0.0 once it has decayed past float range)."""
    # (b * h - now) / h rather than b - now / h: exact to the last bits even for a half-life of
    # seconds, where both terms are ~1e9.
    bottom = REVENUE_BAND_BITS * band - REVENUE_UNIT_BITS
    return revenue_units * 2.0 ** ((bottom * half_life_s - now_s) / half_life_s)


def index_sum(index_units: float) -> float:
    """A quadrant_totals sum of experience indexes, from its units."""
    return index_units / 2.0**INDEX_UNIT_BITS


def future_overcount(revenue_sum: float, last_event_at: datetime, now: datetime, half_life_s: float) -> float:
    """What a band counts for a customer whose last event is after `now`, beyond its full value."""
    return revenue_sum * decay_factor(epoch_seconds(last_event_at), epoch_seconds(now), half_life_s) - revenue_sum
