"""mqttd: one supervised MQTT -> Django ORM ingestion daemon per tenant project."""
from __future__ import annotations

__version__ = "0.1.0"  # the one place the version lives (pyproject.toml reads it; see CHANGELOG.md)

from mqttd.message import Message, PayloadError  # noqa: E402
from mqttd.router import route  # noqa: E402

__all__ = ["Message", "PayloadError", "Publisher", "publish", "publish_many", "publish_on_commit", "route",
           "__version__"]

_LAZY = {"Publisher", "publish", "publish_many", "publish_on_commit"}


def __getattr__(name: str) -> object:  # PEP 562
    """``mqttd.publish`` and friends, imported on first use so ``import mqttd`` never loads paho."""
    if name in _LAZY:
        from mqttd import publisher

        return getattr(publisher, name)
    raise AttributeError(f"module 'mqttd' has no attribute {name!r}")
