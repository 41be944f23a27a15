"""The sample tenant's URLs: the Django admin (mqttd's dead-letter screen is part of it).

The admin's CSS and JavaScript are served from django.contrib.admin's own static directory by
Django itself, also with DEBUG off, so that ``manage.py runserver`` shows a usable admin without
``collectstatic`` or the staticfiles app (a sample and test project; a real site lets its web
server serve static files).
"""
from pathlib import Path

import django.contrib.admin
from django.conf import settings
from django.contrib import admin
from django.urls import path, re_path
from django.views.generic import RedirectView
from django.views.static import serve

ADMIN_STATIC = Path(django.contrib.admin.__file__).resolve().parent / "static"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", RedirectView.as_view(url="/admin/", permanent=False)),
    re_path(r"^%s(?P<path>.*)$" % settings.STATIC_URL.lstrip("/"), serve, {"document_root": ADMIN_STATIC}),
]
