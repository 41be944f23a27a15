"""A sample tenant project: the Django settings a user of mqttd would have.

The database comes from the environment so one code base serves several tenants in the tests:
TENANT_DB_ENGINE=sqlite|postgres, TENANT_DB_NAME=path-or-database-name.
"""
import os

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
            "OPTIONS": {"init_command": "PRAGMA journal_mode=WAL;", "timeout": 30},
            "CONN_MAX_AGE": None,
        }
    }

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
