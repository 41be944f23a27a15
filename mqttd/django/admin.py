"""The Django admin of mqttd's models: the operator's dead-letter screen.

Dead letters are read-only here (no add, no edit: the change view is a detail view). Two actions:
*Replay selected* runs letters again through ``mqttd.ops.replay.replay_letter``, the code and dedupe
rules of ``mqttd replay``; *Discard selected* deletes them after Django's confirmation page.
Replaying needs the change permission, discarding the delete permission.

The web process has no mqttd config file of its own, so the routes a replay uses are found like
this: the ``@route`` handlers of every installed app's ``mqtt_handlers`` module, plus the
``[[subscribe]]`` routes of the config named by ``settings.MQTTD_CONFIG``, else ``$MQTTD_CONFIG``,
else ``/etc/mqttd/PROJECT.toml`` when the project is known (``settings.MQTTD_PROJECT``,
``$MQTTD_PROJECT`` or ``$PROJECT_NAME``) and that file exists. Without a config file only the
``@route`` handlers are known; a letter that then matches no route stays, and the message says so.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe
from django.utils.text import Truncator

from mqttd.django.display import ErrorClassFilter, RouteFilter, payload_html, payload_preview, pre
from mqttd.django.models import DeadLetter, InboxMessage, ProcessedKey

# ---- replay: the routes the web process knows ---------------------------------------------------

def replay_config_file() -> Path | None:
    """The mqttd config whose ``[[subscribe]]`` routes a replay from the admin uses (see the module
    docstring), or None: then only the ``@route`` handlers are known."""
    explicit = getattr(settings, "MQTTD_CONFIG", None) or os.environ.get("MQTTD_CONFIG")
    if explicit:
        return Path(explicit)
    project = (getattr(settings, "MQTTD_PROJECT", None) or os.environ.get("MQTTD_PROJECT")
               or os.environ.get("PROJECT_NAME"))
    if project:
        from mqttd.config import DEFAULT_CONFIG_DIR

        candidate = Path(DEFAULT_CONFIG_DIR) / f"{project}.toml"
        if candidate.is_file():
            return candidate
    return None


def replay_tools() -> tuple[Any, Any, Path | None]:
    """``(router, deduper, config file)`` built like ``mqttd replay`` builds them: the discovered
    ``@route`` handlers plus the config's ``[[subscribe]]`` routes, and a Deduper with the config's
    ``dispatch.dedupe_property``. Raises MqttdError (ConfigError) for a config that does not load."""
    from mqttd.config import load
    from mqttd.ingest.dedupe import Deduper
    from mqttd.router import Router, discover, registered_routes, routes_from_config

    path = replay_config_file()
    config = load(path, os.environ) if path is not None else None
    discover()
    routes = registered_routes()
    if config is not None:
        routes += routes_from_config(config.subscribe, str(path))
    deduper = Deduper(True, config.dispatch.dedupe_property if config is not None else None)
    return Router(routes), deduper, path


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# ---- the admins -------------------------------------------------------------------------------

@admin.register(DeadLetter)
class DeadLetterAdmin(admin.ModelAdmin):
    list_display = ("id", "short_topic", "route_breakable", "short_error", "attempts", "payload_preview", "created_at")
    list_display_links = ("id", "short_topic")
    list_filter = (RouteFilter, ErrorClassFilter, "created_at")
    search_fields = ("topic",)
    search_help_text = "Search by topic"
    list_per_page = 50
    actions = ["replay_selected"]
    readonly_fields = ("topic", "route", "qos", "attempts", "created_at", "updated_at", "payload_shown",
                       "error_shown", "traceback_shown", "properties_shown", "replay_button")
    fieldsets = (
        (None, {"fields": ("topic", "route", "qos", "attempts", "created_at", "updated_at")}),
        ("Payload", {"fields": ("payload_shown",)}),
        ("Error", {"fields": ("error_shown", "traceback_shown")}),
        ("MQTT properties", {"fields": ("properties_shown",), "classes": ("collapse",)}),
    )

    # -- read-only: no add, no edit; the change view is a detail view --------------------------
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: DeadLetter | None = None) -> bool:
        # No letter is ever edited; the model-level change permission is what *Replay selected* needs.
        if obj is not None:
            return False
        return super().has_change_permission(request)

    def get_fieldsets(self, request: HttpRequest, obj: DeadLetter | None = None) -> Any:
        fieldsets = list(super().get_fieldsets(request, obj))
        if obj is not None and self.has_change_permission(request):
            fieldsets.insert(0, (None, {"fields": ("replay_button",)}))
        return fieldsets

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None) -> Any:
        return super().changelist_view(request, {"title": "Dead letters", **(extra_context or {})})

    def get_actions(self, request: HttpRequest) -> dict:
        actions = super().get_actions(request)
        ordered = {}
        if "replay_selected" in actions:
            ordered["replay_selected"] = actions.pop("replay_selected")
        if "delete_selected" in actions:
            # Django's own delete action (with its confirmation page), under the operator's word.
            func, name, _ = actions.pop("delete_selected")
            ordered["delete_selected"] = (func, name, "Discard selected dead letters")
        ordered.update(actions)
        return ordered

    # -- columns and fields ------------------------------------------------------------------------
    @admin.display(description="topic", ordering="topic")
    def short_topic(self, obj: DeadLetter) -> str:
        return Truncator(obj.topic).chars(80)

    @admin.display(description="route", ordering="route")
    def route_breakable(self, obj: DeadLetter) -> str:
        # Dotted handler paths are long: let the column wrap after each dot.
        return format_html_join(mark_safe(".<wbr>"), "{}", ((part,) for part in obj.route.split("."))) or "-"

    @admin.display(description="error")
    def short_error(self, obj: DeadLetter) -> str:
        return Truncator(obj.error).chars(80)

    @admin.display(description="payload")
    def payload_preview(self, obj: DeadLetter) -> str:
        return format_html('<code style="word-break: break-all;">{}</code>', payload_preview(bytes(obj.payload)))

    @admin.display(description="payload")
    def payload_shown(self, obj: DeadLetter) -> str:
        return payload_html(bytes(obj.payload))

    @admin.display(description="error")
    def error_shown(self, obj: DeadLetter) -> str:
        return pre(obj.error)

    @admin.display(description="traceback")
    def traceback_shown(self, obj: DeadLetter) -> str:
        return pre(obj.traceback) if obj.traceback else "-"

    @admin.display(description="properties")
    def properties_shown(self, obj: DeadLetter) -> str:
        if not obj.properties:
            return "-"
        return pre(json.dumps(obj.properties, indent=2, ensure_ascii=False, sort_keys=True))

    @admin.display(description="replay")
    def replay_button(self, obj: DeadLetter) -> str:
        # A submit button of the (field-less) detail form aimed at the list's *Replay selected*.
        url = reverse("admin:mqttd_deadletter_changelist", current_app=self.admin_site.name)
        return format_html('<input type="hidden" name="_selected_action" value="{}">'
                           '<button type="submit" class="button" name="action" value="replay_selected" '
                           'formaction="{}" style="padding: 6px 12px;">Replay this letter</button>', obj.pk, url)

    # -- actions -------------------------------------------------------------------------------------
    @admin.action(description="Replay selected dead letters", permissions=["change"])
    def replay_selected(self, request: HttpRequest, queryset: QuerySet) -> None:
        from mqttd.errors import MqttdError
        from mqttd.ops.replay import replay_letter

        try:
            router, deduper, config_file = replay_tools()
        except MqttdError as exc:
            self.message_user(request, f"Nothing replayed: the mqttd config does not load: {exc}", messages.ERROR)
            return
        replayed = duplicates = gone = 0
        failed: list[str] = []
        unrouted: list[str] = []
        for letter_id in list(queryset.order_by("id").values_list("id", flat=True)):
            try:
                out = replay_letter(letter_id, router, deduper)
            except MqttdError as exc:       # the database went away: stop, nothing half-done
                self.message_user(request, f"Replay stopped at letter #{letter_id}: {exc}", messages.ERROR)
                break
            if out is None:
                gone += 1
            elif out.status == "replayed":
                replayed += 1
            elif out.status == "duplicate":
                duplicates += 1
            elif not out.routes:
                unrouted.append(f"#{letter_id} {Truncator(out.topic).chars(80)}")
            else:
                failed.append(f"#{letter_id} {Truncator(out.error or '').chars(200)} (attempts {out.attempts})")
        if replayed:
            self.message_user(request, f"Replayed {_plural(replayed, 'dead letter')}: handled and deleted.",
                              messages.SUCCESS)
        if duplicates:
            self.message_user(request, f"{_plural(duplicates, 'dead letter')} resolved as duplicate: the dedupe key "
                              "is already recorded, so the handler was not run; deleted.", messages.SUCCESS)
        if failed:
            self.message_user(request, f"{_plural(len(failed), 'dead letter')} failed again (attempts and error "
                              f"updated): {'; '.join(failed[:10])}{' …' if len(failed) > 10 else ''}", messages.ERROR)
        if unrouted:
            known = ("the @route handlers of the installed apps and the [[subscribe]] routes of "
                     f"{config_file}" if config_file else
                     "only the @route handlers of the installed apps: no mqttd config file is known to this "
                     "web process (set settings.MQTTD_CONFIG or the environment variable MQTTD_CONFIG to the "
                     "daemon's config file for its [[subscribe]] routes)")
            self.message_user(request, f"{_plural(len(unrouted), 'dead letter')} matched no route and stayed "
                              f"(attempts updated): {', '.join(unrouted[:10])}{' …' if len(unrouted) > 10 else ''}. "
                              f"The admin knows {known}.", messages.WARNING)
        if gone:
            self.message_user(request, f"{_plural(gone, 'dead letter')} already gone (replayed or discarded "
                              "meanwhile).", messages.INFO)


@admin.register(InboxMessage)
class InboxMessageAdmin(admin.ModelAdmin):
    list_display = ("id", "short_topic", "qos", "retain", "payload_preview", "received_at")
    list_display_links = ("id", "short_topic")
    list_filter = ("qos", "retain", "received_at")
    search_fields = ("topic",)
    search_help_text = "Search by topic"
    date_hierarchy = "received_at"
    list_per_page = 50
    readonly_fields = ("topic", "qos", "retain", "received_at", "payload_shown")
    fields = readonly_fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: InboxMessage | None = None) -> bool:
        return False

    @admin.display(description="topic", ordering="topic")
    def short_topic(self, obj: InboxMessage) -> str:
        return Truncator(obj.topic).chars(80)

    @admin.display(description="payload")
    def payload_preview(self, obj: InboxMessage) -> str:
        return payload_preview(bytes(obj.payload))

    @admin.display(description="payload")
    def payload_shown(self, obj: InboxMessage) -> str:
        return payload_html(bytes(obj.payload))


@admin.register(ProcessedKey)
class ProcessedKeyAdmin(admin.ModelAdmin):
    """Read-only: deleting a key would let a redelivered message run its handler a second time."""

    list_display = ("route", "key", "created_at")
    list_filter = ("route", "created_at")
    search_fields = ("key",)
    search_help_text = "Search by key"
    readonly_fields = ("route", "key", "created_at")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: ProcessedKey | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: ProcessedKey | None = None) -> bool:
        return False
