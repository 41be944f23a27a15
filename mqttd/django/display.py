"""How the dead-letter screen shows things: payloads (JSON pretty-printed, text, or a hex dump),
error classes, and the list filters by error class and route. No model admin here (``admin``)."""
from __future__ import annotations

import json
import re
from typing import Any

from django.contrib import admin
from django.db.models import Case, F, QuerySet, TextField, Value, When
from django.db.models.functions import Left, StrIndex, Substr
from django.http import HttpRequest
from django.utils.html import format_html
from django.utils.safestring import mark_safe
from django.utils.text import Truncator

PAYLOAD_SHOWN = 64 * 1024      # bytes (hex) or characters (text, JSON) shown on a detail page
ERROR_CLASS_MAX = 100          # characters of an error class
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


# ---- payloads ---------------------------------------------------------------------------------

def payload_kind(data: bytes) -> tuple[str, str]:
    """``(kind, text)``: ``("JSON", pretty)`` when the payload parses as JSON, ``("text", text)``
    when it is UTF-8 without control characters, else ``("hex", hexdump)``; ``("empty", "")``."""
    if not data:
        return "empty", ""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and not _CONTROL.search(text):
        try:
            return "JSON", json.dumps(json.loads(text), indent=2, ensure_ascii=False)
        except (ValueError, RecursionError):
            return "text", text
    return "hex", hexdump(data[:PAYLOAD_SHOWN])


def hexdump(data: bytes) -> str:
    """``00000000  7b 22 61 22 ...  |{"a"...|``: 16 bytes a line, offset, hex and ASCII."""
    lines = []
    for off in range(0, len(data), 16):
        chunk = data[off:off + 16]
        hexpart = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{off:08x}  {hexpart:<47}  |{text}|")
    return "\n".join(lines)


def pre(text: str, limit: int = PAYLOAD_SHOWN) -> str:
    more = ""
    if len(text) > limit:
        more = f"\n… ({len(text) - limit:,} more characters not shown)"
        text = text[:limit]
    return format_html('<pre style="white-space: pre-wrap; word-break: break-all; max-height: 40em; overflow: auto; '
                       'margin: 0; padding: 6px; border: 1px solid var(--hairline-color, #ddd);">{}{}</pre>',
                       text, more)


def payload_html(data: bytes) -> str:
    kind, text = payload_kind(data)
    if kind == "empty":
        return mark_safe("<em>empty (0 bytes)</em>")
    note = f"{kind}, {len(data):,} bytes"
    if kind == "hex" and len(data) > PAYLOAD_SHOWN:
        note += f" (the first {PAYLOAD_SHOWN:,} shown)"
    return format_html("<div><strong>{}</strong></div>{}", note, pre(text))


def payload_preview(data: bytes, width: int = 40) -> str:
    kind, text = payload_kind(bytes(data[:4096]) if len(data) > 4096 else bytes(data))
    if kind == "JSON":
        text = json.dumps(json.loads(text), ensure_ascii=False)
    elif kind == "hex":
        text = "0x" + bytes(data[:32]).hex()
    elif kind == "empty":
        return "(empty)"
    return Truncator(text.replace("\n", " ")).chars(width)


# ---- error classes ----------------------------------------------------------------------------

def error_class(error: str) -> str:
    """The text before the first ":" of an error (``ValueError: ...`` -> ``ValueError``)."""
    return error.split(":", 1)[0][:ERROR_CLASS_MAX]


def _error_class_expr() -> Any:
    """``error_class`` in SQL (SQLite and PostgreSQL alike)."""
    colon = StrIndex("error", Value(":"))
    return Left(Case(When(error__contains=":", then=Substr("error", 1, colon - 1)), default=F("error"),
                     output_field=TextField()), ERROR_CLASS_MAX)


class ErrorClassFilter(admin.SimpleListFilter):
    title = "error class"
    parameter_name = "error_class"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        classes = (model_admin.get_queryset(request).annotate(mqttd_error_class=_error_class_expr())
                   .order_by("mqttd_error_class").values_list("mqttd_error_class", flat=True).distinct()[:100])
        return [(c, c or "(empty)") for c in classes]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet | None:
        if self.value() is None:
            return None
        return queryset.annotate(mqttd_error_class=_error_class_expr()).filter(mqttd_error_class=self.value())


class RouteFilter(admin.SimpleListFilter):
    title = "route"
    parameter_name = "route"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        routes = (model_admin.get_queryset(request).order_by("route")
                  .values_list("route", flat=True).distinct()[:200])
        return [(r, r or "(no route)") for r in routes]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet | None:
        if self.value() is None:
            return None
        return queryset.filter(route=self.value())
