"""The message path after the network thread: intake -> dispatcher -> batch runner (dedupe,
poison list, dead letters, canary) -> commit -> ack through the session's ``Acker``."""
