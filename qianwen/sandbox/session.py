"""`Session`: one sandboxed interpreter kept alive across calls, like a notebook kernel."""

from __future__ import annotations

import time

from .box import GRACE, START, Box
from .inside.protocol import LIMIT_NAMES
from .limits import Limits, check_code, check_files, check_timeout
from .result import Result


class Session:
    """A Python interpreter kept alive across calls in one sandbox, like a notebook kernel: variables persist,
    and when a call's last statement is an expression its repr() comes back as `Result.value`. Each call has its
    own timeout; a timeout or crash restarts the interpreter (variables are lost, files in the working directory
    are kept) and the result says so. Sessions share nothing with each other."""

    def __init__(self, *, limits: Limits | None = None, files: dict[str, bytes] | None = None) -> None:
        self.limits = limits or Limits()
        self._files = check_files(files, self.limits)
        self._cells = 0
        self._box: Box | None = None
        self._closed = False
        self._start()

    def _start(self) -> Box:
        self._box = Box("session", self.limits, self._files)
        self._box.wait_started(time.monotonic() + START)
        return self._box

    @property
    def network_isolated(self) -> bool:
        return self._box is not None and self._box.isolated

    def run(self, code: str, *, timeout: float = 10.0) -> Result:
        """Run one cell; the timeout counts from the call."""
        check_code(code)
        check_timeout(timeout)
        if self._closed:
            raise ValueError("This session is closed; start a new Session.")
        notes = []
        if self._box is not None:
            self._box.drain()
            if not self._box.alive:
                self._box.close()
                self._box = None
                notes.append("The sandbox had stopped and was started again: variables and files are lost.")
        box = self._box or self._start()
        box.reset_output()
        self._cells += 1
        cell = self._cells
        start = time.monotonic()
        box.send({"op": "run", "code": code, "cell": cell})
        deadline, stopped, files, dropped = start + timeout, False, {}, []
        while True:
            event = box.next_event(deadline)
            if event is None and not stopped:
                stopped = True
                box.send({"op": "stop"})
                deadline = time.monotonic() + GRACE
                continue
            if event is None or event["event"] == "lost":
                box.close()
                self._box = None
                notes.append("The sandbox stopped responding and was stopped: variables and files are lost.")
                return box.result("timeout" if stopped else "killed", start, notes=notes, restarted=True)
            if event.get("cell") != cell:  # about an earlier call, or about none: only a death matters
                if event["event"] == "exit":
                    how = _ended(box.result_from_exit(event, 0.0))
                    notes.append(f"The interpreter had stopped between calls ({how}); variables are lost.")
                continue
            files.update(event["files"])
            dropped += event["files_dropped"]
            if event["event"] == "reply" and not stopped:
                box.drain()
                reply = event["replies"][-1] if event["replies"] else {}
                limit = reply.get("hint") if reply.get("hint") in LIMIT_NAMES else None
                status = "ok" if reply.get("status") == "ok" else "limit" if limit else "error"
                result = box.result(status, start, notes=notes, limit=limit, files=files, dropped=dropped)
                result.value = reply.get("value") if isinstance(reply.get("value"), str) else None
                result.completed, result.restarted = status == "ok", bool(notes)
                return result
            if event["event"] == "exit" and not stopped:
                box.drain()
                result = box.result_from_exit(event, time.monotonic() - start)
                notes.append(f"The interpreter stopped ({_ended(result)}) and was restarted: variables are lost.")
                result.stderr += "".join(f"\n[sandbox] {note}\n" for note in notes)
                result.files, result.files_dropped, result.restarted = files, dropped, True
                return result
            if event["event"] == "restarted" or (stopped and event["event"] == "exit"):  # a new worker took over
                box.drain()
                notes.append(
                    f"The call timed out after {timeout:g} s; the interpreter was restarted: variables are lost, "
                    "files in the working directory are kept."
                )
                return box.result("timeout", start, notes=notes, files=files, dropped=dropped, restarted=True)

    def close(self) -> None:
        """Stop the interpreter and drop its working directory."""
        self._closed = True
        if self._box is not None:
            self._box.close()
            self._box = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _ended(result: Result) -> str:
    if result.limit:
        return f"it hit the {result.limit} limit"
    if result.signal:
        return f"killed by signal {result.signal}"
    return f"exit code {result.exit_code}"
