"""What a run, or one session call, did."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Result:
    """What a run (or one session call) did.

    status: "ok" (exit code 0), "error" (non-zero exit or an uncaught exception), "timeout" (stopped at the
    wall-clock limit), "killed" (ended by a signal), "limit" (stopped by a resource limit, named in `limit`:
    "cpu", "memory", "processes", "file_size", "open_files" or "disk")."""

    status: str
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    signal: int | None = None
    limit: str | None = None
    duration: float = 0.0
    files: dict[str, bytes] = dataclasses.field(default_factory=dict)  # created or changed in the working dir
    files_dropped: list[str] = dataclasses.field(default_factory=list)  # changed, but over returned_files_bytes
    stdout_dropped: int = 0
    stderr_dropped: int = 0
    completed: bool = False  # the code's last line ran (not ended by sys.exit, os._exit, a signal or an error)
    network_isolated: bool = False
    value: str | None = None  # a session call's last expression, as repr()
    restarted: bool = False  # a session's interpreter was restarted during or before this call: variables lost

    @property
    def passed(self) -> bool:
        """HumanEval's verdict: the program ran to its end and exited 0."""
        return self.status == "ok" and self.completed
