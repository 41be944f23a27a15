import time


def wait_until(fn, timeout: float = 30.0, what: str = "condition", interval: float = 0.1):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def wait_rows(db, n: int, table: str = "sensors_reading", where: str = "1=1", timeout: float = 60.0,
              what: str = "count(*)") -> int:
    """Wait until ``what`` (e.g. ``count(distinct seq)``: every message, duplicates aside) reaches n."""
    def count():
        c = db.scalar(f"select {what} from {table} where {where}")
        return c if c >= n else None
    try:
        return wait_until(count, timeout, f"{n} rows in {table}")
    except AssertionError:
        raise AssertionError(f"only {db.scalar(f'select {what} from {table} where {where}')}/{n} ({what}) in {table}")
