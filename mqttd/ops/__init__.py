"""Operator commands the daemon never imports: check, replay, recover, the Supervisor event
listener."""
