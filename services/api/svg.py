"""The positioning map as an SVG picture (the seed's figure): four quadrants, one bubble each.

x is the experience standard (low to high), y the revenue (low to high); a bubble's area is
proportional to its quadrant's revenue. Hand-written SVG: every piece of text is escaped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from xml.sax.saxutils import escape, quoteattr

WIDTH, HEIGHT = 760, 600
LEFT, TOP, RIGHT, BOTTOM = 90, 70, 730, 530  # the plot area
DIVIDER = 'stroke="#888" stroke-dasharray="6 4"'
MAX_RADIUS_SHARE = 0.38  # of the smaller side of a quadrant, for the quadrant with the most revenue


@dataclass(frozen=True)
class QuadrantStyle:
    title: str
    advice: str
    fill: str
    stroke: str
    right: bool  # good experience
    top: bool  # high revenue


STYLES = {
    "exemplary": QuadrantStyle("Exemplary", "keep", "#e3f4e6", "#2e7d32", right=True, top=True),
    "growth": QuadrantStyle("Growth", "cross-sell", "#e3eef9", "#1565c0", right=True, top=False),
    "at_risk": QuadrantStyle("At risk", "improve urgently", "#fbe4e4", "#c62828", right=False, top=True),
    "disengaged": QuadrantStyle("Disengaged", "", "#eeeeee", "#616161", right=False, top=False),
}


@dataclass(frozen=True)
class Bubble:
    quadrant: str
    customers: int
    revenue: float


def _text(x: float, y: float, content: str, **attributes: str) -> str:
    rendered = "".join(f" {name.replace('_', '-')}={quoteattr(value)}" for name, value in attributes.items())
    return f'<text x="{x:.1f}" y="{y:.1f}"{rendered}>{escape(content)}</text>'


def format_money(amount: float, currency: str | None) -> str:
    figure = f"{amount:,.0f}" if amount >= 100 or amount == 0 else f"{amount:,.2f}"
    return f"{currency} {figure}" if currency else figure


def render_positioning_map(
    bubbles: list[Bubble], title: str, as_of: datetime, currency: str | None = None, note: str | None = None
) -> str:
    middle_x, middle_y = (LEFT + RIGHT) / 2, (TOP + BOTTOM) / 2
    quadrant_width, quadrant_height = (RIGHT - LEFT) / 2, (BOTTOM - TOP) / 2
    max_radius = MAX_RADIUS_SHARE * min(quadrant_width, quadrant_height)
    max_revenue = max((bubble.revenue for bubble in bubbles), default=0.0)

    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="Helvetica, Arial, sans-serif" role="img">',
        f"<title>{escape(title)}</title>",
        _text(WIDTH / 2, 32, title, text_anchor="middle", font_size="20", font_weight="bold"),
        _text(WIDTH / 2, 52, f"as of {as_of:%Y-%m-%d %H:%M} UTC" + (f" · {note}" if note else ""),
              text_anchor="middle", font_size="12", fill="#555"),  # fmt: skip
    ]
    for bubble in bubbles:
        style = STYLES[bubble.quadrant]
        x0 = middle_x if style.right else LEFT
        y0 = TOP if style.top else middle_y
        parts.append(
            f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{quadrant_width:.1f}" height="{quadrant_height:.1f}" '
            f'fill="{style.fill}" stroke="#ffffff" stroke-width="2"/>'
        )
        # The quadrant's name in its outer corner.
        label_x = x0 + quadrant_width - 12 if style.right else x0 + 12
        label_y = y0 + 24 if style.top else y0 + quadrant_height - 30
        anchor = "end" if style.right else "start"
        parts.append(_text(label_x, label_y, style.title, text_anchor=anchor, font_size="16",
                           font_weight="bold", fill=style.stroke))  # fmt: skip
        if style.advice:
            parts.append(_text(label_x, label_y + 18, style.advice, text_anchor=anchor, font_size="13",
                               fill=style.stroke))  # fmt: skip

        # Nudged away from the quadrant's name, which sits in the outer corner.
        centre_x, centre_y = x0 + quadrant_width / 2, y0 + quadrant_height / 2 + (14 if style.top else -14)
        # Area proportional to revenue: the radius goes with its square root.
        radius = max_radius * math.sqrt(bubble.revenue / max_revenue) if max_revenue > 0 else 0.0
        if radius > 0:
            parts.append(
                f'<circle cx="{centre_x:.1f}" cy="{centre_y:.1f}" r="{radius:.1f}" fill="{style.stroke}" '
                f'fill-opacity="0.35" stroke="{style.stroke}" stroke-width="1.5">'
                f"<title>{escape(STYLES[bubble.quadrant].title)}: {bubble.customers} customers, "
                f"revenue {escape(format_money(bubble.revenue, currency))}</title></circle>"
            )
        # A white halo keeps the labels readable across a bubble's edge.
        halo = {"text_anchor": "middle", "fill": "#222", "stroke": "#ffffff", "stroke_width": "3",
                "paint_order": "stroke"}  # fmt: skip
        noun = "customer" if bubble.customers == 1 else "customers"
        parts.append(_text(centre_x, centre_y - 2, f"{bubble.customers:,} {noun}", font_size="14",
                           font_weight="bold", **halo))  # fmt: skip
        parts.append(_text(centre_x, centre_y + 16, format_money(bubble.revenue, currency), font_size="13", **halo))

    parts += [
        # The thresholds divide the plane; the axes run from low to high.
        f'<line x1="{middle_x:.1f}" y1="{TOP}" x2="{middle_x:.1f}" y2="{BOTTOM}" {DIVIDER}/>',
        f'<line x1="{LEFT}" y1="{middle_y:.1f}" x2="{RIGHT}" y2="{middle_y:.1f}" {DIVIDER}/>',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="8" markerHeight="8" '
        'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#333"/></marker></defs>',
        f'<line x1="{LEFT}" y1="{BOTTOM}" x2="{RIGHT + 10}" y2="{BOTTOM}" stroke="#333" stroke-width="1.5" '
        'marker-end="url(#arrow)"/>',
        f'<line x1="{LEFT}" y1="{BOTTOM}" x2="{LEFT}" y2="{TOP - 10}" stroke="#333" stroke-width="1.5" '
        'marker-end="url(#arrow)"/>',
        _text(LEFT, BOTTOM + 22, "low", text_anchor="start", font_size="12", fill="#555"),
        _text(RIGHT, BOTTOM + 22, "high", text_anchor="end", font_size="12", fill="#555"),
        _text(middle_x, BOTTOM + 44, "Experience standard (experience index)", text_anchor="middle", font_size="14"),
        _text(LEFT - 12, BOTTOM, "low", text_anchor="end", font_size="12", fill="#555"),
        _text(LEFT - 12, TOP + 4, "high", text_anchor="end", font_size="12", fill="#555"),
        f'<text x="{LEFT - 40}" y="{middle_y:.1f}" text-anchor="middle" font-size="14" '
        f'transform="rotate(-90 {LEFT - 40} {middle_y:.1f})">Revenue</text>',
        _text(RIGHT, HEIGHT - 12, "Bubble area is proportional to the quadrant's revenue", text_anchor="end",
              font_size="11", fill="#777"),  # fmt: skip
        "</svg>",
    ]
    return "\n".join(parts) + "\n"
