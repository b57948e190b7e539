"""deploy/grafana/cosmos-gateway.json is a valid Grafana dashboard model (issue 14 §2), checked with Grafana's
own grafana-foundation-sdk (its types are generated from Grafana's schema): the file decodes into the SDK's
Dashboard, every panel into a known panel type with that type's options and every query into a Prometheus
query, and encoding it again gives back every key and value of the file (a key outside the schema would be lost,
a value of the wrong kind changed). The SDK only adds the schema's defaults. Its PromQL is run against a real
Prometheus in test_prometheus.py."""

from __future__ import annotations

import json
from typing import Any

from grafana_foundation_sdk.cog import plugins
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import prometheus
from grafana_foundation_sdk.models.dashboard import Dashboard, Panel, RowPanel

from tests.deploy.test_prometheus import DASHBOARD

GRID_COLUMNS = 24


def lost_or_changed(original: Any, encoded: Any, path: str = "") -> list[str]:
    """What of `original` is missing or different in `encoded` (keys `encoded` adds are the SDK's defaults)."""
    if isinstance(original, dict):
        if not isinstance(encoded, dict):
            return [f"{path}: {encoded!r}"]
        return [problem for key, value in original.items()
                for problem in (lost_or_changed(value, encoded[key], f"{path}/{key}") if key in encoded
                                else [f"{path}/{key}: not in the schema"])]
    if isinstance(original, list):
        if not isinstance(encoded, list) or len(encoded) != len(original):
            return [f"{path}: {encoded!r}"]
        return [p for i, (a, b) in enumerate(zip(original, encoded, strict=True))
                for p in lost_or_changed(a, b, f"{path}[{i}]")]
    return [] if original == encoded and type(original) is type(encoded) else [f"{path}: {original!r} → {encoded!r}"]


def test_the_dashboard_is_a_valid_grafana_model() -> None:
    plugins.register_default_plugins()  # the panel and query kinds, so that their options decode typed
    raw = json.loads(DASHBOARD.read_text())
    dashboard = Dashboard.from_json(raw)
    encoded = json.loads(json.dumps(dashboard, cls=JSONEncoder))
    assert lost_or_changed(raw, encoded) == []

    assert dashboard.uid == "cosmos-gateway" and dashboard.panels
    ids: set[int] = set()
    for panel in dashboard.panels:
        assert isinstance(panel, Panel | RowPanel)
        assert panel.id_val not in ids, f"panel id {panel.id_val} twice"
        ids.add(panel.id_val)  # type: ignore[arg-type]
        grid = panel.grid_pos
        assert grid is not None and 0 <= grid.x and grid.x + grid.w <= GRID_COLUMNS, panel.title
        if isinstance(panel, Panel):
            # Decoded by the panel plugin's own types: a misspelt panel type would stay a plain dict.
            assert not isinstance(panel.options, dict), f"{panel.title}: unknown panel type {panel.type_val}"
            assert panel.targets, panel.title
            for target in panel.targets:
                assert isinstance(target, prometheus.Dataquery), panel.title
                assert target.expr and target.ref_id, panel.title
