"""The Django app ``mqttd.django`` (app label ``mqttd``): inbox, dead letters, dedupe keys."""
