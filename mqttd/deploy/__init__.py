"""Inventory -> Supervisor ``conf.d``: parse the inventory, render each program, apply the
files, and talk to supervisord over XML-RPC."""
