"""The chaos soak's own parts (``scripts/soak``): the stack it runs (``env``), the faults it injects
(``faults``), the publisher (``pub``), resource sampling (``resources``) and the end report
(``report``). Only the soak uses them; the private broker, tenant databases and supervisord they
start are the test suite's (``scripts/lab``), shared with it."""
