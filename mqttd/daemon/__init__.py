"""The process: composition root and run loop (``run``), watchdog, status snapshot, metrics,
lock, logs, daemonize, and bringing up the tenant's Django (``tenant``)."""
