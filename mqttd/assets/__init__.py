"""Deployment assets shipped inside the package, for hosts that installed mqttd with pip.

``mqttd assets --list`` names them; ``mqttd assets NAME`` prints one, byte for byte, e.g.
``mqttd assets systemd > /etc/systemd/system/mqttd@.service``. These files are the source: the
repository's ``deploy/`` holds symlinks to them, so the two can never differ.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class Asset:
    name: str         # what `mqttd assets NAME` takes
    filename: str     # the file in this package
    repo_path: str    # its place in the repository's deploy/
    use: str          # where it goes on a host


ASSETS: tuple[Asset, ...] = (
    Asset("systemd", "mqttd@.service", "deploy/systemd/mqttd@.service",
          "systemd unit template: /etc/systemd/system/mqttd@.service, then systemctl enable --now mqttd@PROJECT"),
    Asset("logrotate", "mqttd.logrotate", "deploy/logrotate/mqttd",
          "logrotate config: /etc/logrotate.d/mqttd"),
    Asset("alerts", "mqttd-alerts.yml", "deploy/prometheus/mqttd-alerts.yml",
          "Prometheus alert rules: list under rule_files in prometheus.yml"),
    Asset("alerts-test", "mqttd-alerts.test.yml", "deploy/prometheus/mqttd-alerts.test.yml",
          "their unit tests: promtool test rules mqttd-alerts.test.yml (next to mqttd-alerts.yml)"),
    Asset("dashboard", "mqttd-dashboard.json", "deploy/grafana/mqttd-dashboard.json",
          "Grafana dashboard: Dashboards > New > Import, pick the Prometheus data source"),
)


def find(name: str) -> Asset | None:
    """The asset called ``name`` (its short name or its file name), else None."""
    for asset in ASSETS:
        if name in (asset.name, asset.filename):
            return asset
    return None


def read_bytes(asset: Asset) -> bytes:
    return resources.files(__name__).joinpath(asset.filename).read_bytes()


def listing() -> str:
    width = max(len(a.name) for a in ASSETS)
    fwidth = max(len(a.filename) for a in ASSETS)
    return "".join(f"{a.name:<{width}}  {a.filename:<{fwidth}}  {a.use}\n" for a in ASSETS)
