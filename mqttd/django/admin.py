from django.contrib import admin

from .models import DeadLetter, InboxMessage, ProcessedKey


@admin.register(InboxMessage)
class InboxMessageAdmin(admin.ModelAdmin):
    list_display = ("id", "topic", "qos", "retain", "received_at")
    list_filter = ("qos", "retain")
    search_fields = ("topic",)
    date_hierarchy = "received_at"


@admin.register(DeadLetter)
class DeadLetterAdmin(admin.ModelAdmin):
    list_display = ("id", "topic", "route", "error", "attempts", "created_at")
    search_fields = ("topic", "error", "route")
    readonly_fields = ("created_at", "updated_at")


@admin.register(ProcessedKey)
class ProcessedKeyAdmin(admin.ModelAdmin):
    list_display = ("route", "key", "created_at")
    search_fields = ("key", "route")
