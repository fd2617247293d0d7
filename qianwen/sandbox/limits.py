"""What a caller may ask of the sandbox: resource limits, and the checks on code, timeouts and input files."""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits of one run or one session's interpreter."""

    cpu_seconds: int = 60  # CPU time of the process running the code (a session's: over its whole life)
    memory_bytes: int = 1 << 30  # address space of each process
    processes: int = 64  # processes and threads
    file_size_bytes: int = 64 << 20  # largest file the code may write
    open_files: int = 256
    disk_bytes: int = 256 << 20  # the private tmpfs holding the working directory, HOME and /tmp
    output_bytes: int = 1 << 20  # stdout and stderr kept, each; the rest is counted
    returned_files_bytes: int = 16 << 20  # files sent back, in all

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"Limits.{f.name} must be a positive integer, got {value!r}.")


def check_code(code: object) -> None:
    if not isinstance(code, str):
        raise ValueError(f"code must be a string of Python source, got {type(code).__name__}.")


def check_timeout(timeout: object) -> None:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}.")


def check_files(files: dict[str, bytes] | None, limits: Limits) -> dict[str, bytes]:
    """The input files under normalised names, or a ValueError naming the first bad one."""
    checked = {}
    for name, data in (files or {}).items():
        path = os.path.normpath(name) if isinstance(name, str) and name and "\0" not in name else ".."
        if os.path.isabs(path) or path.split(os.sep)[0] in ("..", ".") or not isinstance(data, bytes):
            raise ValueError(f"files must map relative paths inside the working directory to bytes; got {name!r}.")
        checked[path] = data
    for path in checked:
        parent = os.path.dirname(path)
        while parent:
            if parent in checked:
                raise ValueError(f"{parent!r} cannot be both a file and the directory of {path!r} in files.")
            parent = os.path.dirname(parent)
    # As the sandbox's tmpfs counts them: whole 4 KiB pages, one at least for each file and directory.
    directories = {os.path.dirname(p) for p in checked} - {""}
    pages = sum(max(1, -(-len(d) // 4096)) for d in checked.values()) + len(directories)
    if pages * 4096 > limits.disk_bytes:
        raise ValueError(f"The input files do not fit in Limits.disk_bytes ({limits.disk_bytes} bytes).")
    return checked
