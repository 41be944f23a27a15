"""A sample tenant project: the Django settings a user of mqttd would have.

The database comes from the environment so one code base serves several tenants in the tests:
TENANT_DB_ENGINE=sqlite|postgres, TENANT_DB_NAME=path-or-database-name.
"""
import os

import django

SECRET_KEY = "sample-tenant-not-secret"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.admin",
    "django.contrib.sessions",
    "django.contrib.messages",
    "mqttd.django",
    "sensors",
]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
if os.environ.get("TENANT_NO_MQTTD_APP"):
    # A tenant that did not install mqttd's app: dead letters go to LOG_ROOT/NAME/deadletter.jsonl.
    INSTALLED_APPS.remove("mqttd.django")

if os.environ.get("TENANT_DB_ENGINE", "sqlite") == "postgres":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": os.environ["TENANT_DB_NAME"],
            "USER": os.environ.get("TENANT_DB_USER", "postgres"),
            "HOST": os.environ.get("TENANT_DB_HOST", "127.0.0.1"),
            "PORT": os.environ.get("TENANT_DB_PORT", "5432"),
            # Recommended for mqttd: keep the connection, check it before each batch.
            "CONN_MAX_AGE": None,
            "CONN_HEALTH_CHECKS": True,
        }
    }
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ.get("TENANT_DB_NAME", os.path.join(os.path.dirname(__file__), "..", "tenant.sqlite3")),
            "OPTIONS": {"timeout": 30},
            "CONN_MAX_AGE": None,
        }
    }
    if django.VERSION >= (5, 1):
        # WAL: the daemon writes while other processes (the tests, the admin) read.
        DATABASES["default"]["OPTIONS"]["init_command"] = "PRAGMA journal_mode=WAL;"
    else:
        # Django 4.2 - 5.0 have no SQLite "init_command": the same pragma on every new connection.
        from django.db.backends.signals import connection_created

        def _sqlite_wal(sender, connection, **kwargs):
            if connection.vendor == "sqlite":
                with connection.cursor() as cursor:
                    cursor.execute("PRAGMA journal_mode=WAL;")

        connection_created.connect(_sqlite_wal, dispatch_uid="tenant_site.sqlite_wal")

# The admin at /admin/ (urls.py), reachable on the loopback by `manage.py runserver`; the admin's
# static files are served by urls.py from django.contrib.admin's own directory.
ROOT_URLCONF = "tenant_site.urls"
ALLOWED_HOSTS = os.environ.get("TENANT_ALLOWED_HOSTS", "127.0.0.1,localhost,[::1],testserver").split(",")
STATIC_URL = "/static/"

# Enough for the admin (DeadLetter and InboxMessage are registered there).
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": ["django.contrib.auth.context_processors.auth",
                                       "django.contrib.messages.context_processors.messages",
                                       "django.template.context_processors.request"]},
}]

if os.environ.get("TENANT_LOGGING"):
    # A tenant that configures logging the common way: mqttd's own log must keep working.
    LOGGING = {
        "version": 1,
        "disable_existing_loggers": True,
        "handlers": {"console": {"class": "logging.StreamHandler"}},
        "root": {"handlers": ["console"], "level": "WARNING"},
    }

if os.environ.get("TENANT_OTEL_SPANS"):
    # A tenant that traces (the `otel` extra): its tracer provider, set up with its settings.
    from tenant_site import otel

    otel.setup(os.environ["TENANT_OTEL_SPANS"])
