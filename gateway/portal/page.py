"""The tenant's usage page as HTML: usage per meter against the plan, the reset time, the forecast, the period's
history charts and the Manage billing button (PRODUCT.md §6a). Rendered on the server, no scripts.

The numbers are the usage view's (`quota/usage_view.py`, as `GET /_gateway/usage` answers them); the charts are
the console's (`gateway/console/charts.py`), their lines from the usage history (`period_series`), with the
straight line of the usage view where a meter has no history (it is not billed) or the history cannot be read.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
from markupsafe import Markup

from gateway.console.charts import Axis, Series, compact, day_ticks, line_chart, usage_bar
from gateway.console.overview import forecast_line, period_series, period_usage
from metering.usage_history import UsageHistory

_TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("gateway.portal", "templates"), autoescape=True,
                                undefined=jinja2.StrictUndefined)


def render(template: str, **context: Any) -> str:
    return _TEMPLATES.get_template(template).render(**context)


def _when(text: str | None) -> str:
    """`2027-01-01T00:00:00Z` as people read it: `2027-01-01 00:00 UTC`."""
    if not text:
        return "-"
    return datetime.fromisoformat(text).strftime("%Y-%m-%d %H:%M UTC")


def _amount(value: float | int | None) -> str:
    if value is None:
        return "unlimited"
    return f"{value:,}" if isinstance(value, int) else compact(value)


async def usage_page(view: Mapping[str, Any], *, history: UsageHistory | None, now: datetime, csrf: str,
                     billing: str, gauges: frozenset[str]) -> str:
    """The page of one tenant's `view`; `billing` says what the billing section offers: `portal` (the button),
    `no-customer` or `dry-run` (a note instead)."""
    tenant = view["tenant"]
    start = datetime.fromisoformat(view["period"]["start"])
    end = datetime.fromisoformat(view["period"]["end"])
    meters: dict[str, Mapping[str, Any]] = view["meters"]
    lines = await period_series(history, tenant, list(meters), start=start, now=now, gauges=gauges) \
        if history is not None else {}
    axis = Axis(start.timestamp(), end.timestamp(), day_ticks(start, end))
    rows, charts = [], []
    for meter, entry in meters.items():
        used, limit = float(entry["used"]), entry["limit"]
        gauge = meter in gauges
        rows.append({"meter": meter, "entry": entry, "used": _amount(entry["used"]), "limit": _amount(limit),
                     "remaining": "-" if entry["remaining"] is None else _amount(entry["remaining"]),
                     "resets": _when(entry["resets_at"]) if entry["resets_at"] else "never (a current value)",
                     "forecast": _amount(entry["forecast"]),
                     "bar": None if limit is None else Markup(usage_bar(used, float(limit), label=meter))})
        if meter not in lines and limit is None:
            continue  # neither a history nor a limit: the table says it all
        points = lines.get(meter) or await period_usage(tenant, meter, start=start, now=now, used=used, gauge=gauge)
        series = [Series(f"{meter} used", points, "s0")]
        if not gauge:
            series.append(Series(f"{meter} forecast", forecast_line(now, end, used, float(entry["forecast"])), "s2",
                                 dashed=True))
        title = f"{meter}: used this period{'' if gauge else ', forecast'}{'' if limit is None else ' and limit'}"
        chart = line_chart(series, axis, limit=None if limit is None else float(limit), title=title)
        charts.append({"meter": meter, "svg": Markup(chart), "gauge": gauge, "limit": limit is not None,
                       "from_history": meter in lines})
    return render("usage.html", view=view, rows=rows, charts=charts, csrf=csrf, billing=billing,
                  period_start=_when(view["period"]["start"]), period_end=_when(view["period"]["end"]),
                  resets_at=_when(view["period"]["end"]))
