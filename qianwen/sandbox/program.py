"""`run`: code as a whole program (like `python -c`) in a fresh sandbox."""

from __future__ import annotations

import time

from .box import GRACE, Box
from .limits import Limits, check_code, check_files, check_timeout
from .result import Result


def run(
    code: str,
    *,
    timeout: float = 10.0,
    limits: Limits | None = None,
    files: dict[str, bytes] | None = None,
    stdin: str | None = None,
) -> Result:
    """Run `code` as a program (like `python -c`) in a fresh sandbox; `files` are placed in its working directory
    first. The timeout counts from the call, start-up included."""
    check_code(code)
    check_timeout(timeout)
    limits = limits or Limits()
    files = check_files(files, limits)
    if stdin is not None and not isinstance(stdin, str):
        raise ValueError(f"stdin must be a string, got {type(stdin).__name__}.")
    start = time.monotonic()
    box = Box("run", limits, files, code=code, stdin=stdin)
    try:
        deadline, stopped = start + timeout, False
        while True:
            event = box.next_event(deadline)
            if event is None and stopped:  # the supervisor did not answer the stop request
                box.kill()
                return box.result("timeout", start)
            if event is None:
                stopped = True
                box.send({"op": "stop"})
                deadline = time.monotonic() + GRACE
            elif event["event"] == "lost":
                return box.result("timeout" if stopped else "killed", start)
            elif event["event"] == "exit":
                duration = time.monotonic() - start
                box.finish(time.monotonic() + GRACE)
                return box.result_from_exit(event, duration)
    finally:
        box.close()
