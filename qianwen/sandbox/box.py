"""One sandbox seen from the host: starting its process, talking to its supervisor, reading what the code printed,
and turning the supervisor's reports into Results."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import fcntl
import marshal
import os
import select
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import time
import warnings
import weakref

from .inside import main as inside_main
from .inside.linux import count_tasks, kernel_at_least
from .inside.protocol import LIMIT_NAMES, Frames, frame
from .limits import Limits
from .result import Result

_MARKER = "qianwen-sandbox"  # argv[1] of every sandbox process, to tell them apart in `ps`
# The sandboxed interpreter loads the inside package by path, as a bare module with a __path__ (which makes it a
# package) under a name of its own: importlib.util would import contextlib and functools, a noticeable share of its
# start-up, and a directory added to sys.path would let the code import the modules in it. The host imports
# inside_main itself, which writes the .pyc files that the sandbox, on a read-only filesystem, could not write.
_BOOT = (
    f"import sys; p = type(sys)('qianwen_sandbox'); p.__path__ = [{os.path.dirname(inside_main.__file__)!r}]; "
    "sys.modules[p.__name__] = p; from qianwen_sandbox.main import main; main()"
)
GRACE = 2.0  # seconds the supervisor gets to stop the code and report before the host kills the process group
START = 60.0  # seconds a sandbox may take to start, generous for a loaded machine
_unavailable: str | None = None  # why namespaces failed, once they have, so later runs do not retry
_warned: set[str] = set()


def _environment() -> dict[str, str]:
    """All the sandbox sees of an environment: nothing inherited from the host's."""
    return {
        "PATH": f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",  # numerical libraries would otherwise start a thread per core: see Limits.processes
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _no_namespaces() -> str | None:
    if os.environ.get("QIANWEN_SANDBOX_NAMESPACES", "1") == "0":
        return "QIANWEN_SANDBOX_NAMESPACES=0 turns namespaces off"
    return _unavailable


class _Capture:
    def __init__(self, cap: int) -> None:
        self.cap, self.kept, self.dropped = cap, bytearray(), 0

    def add(self, data: bytes) -> None:
        room = max(self.cap - len(self.kept), 0)
        self.kept += data[:room]
        self.dropped += max(len(data) - room, 0)

    def text(self) -> str:
        return self.kept.decode("utf-8", errors="replace")


def _decode(header: bytes, body: bytes) -> dict:
    """A message from the sandbox. Worker replies are the sandboxed code's to forge: they are read as literals and
    anything unexpected is dropped."""
    event = ast.literal_eval(header.decode("utf-8"))
    offset, replies, files = 0, [], {}
    for size in event.pop("replies", []):
        try:
            reply = ast.literal_eval(body[offset : offset + size].decode("utf-8"))
        except (ValueError, SyntaxError, UnicodeDecodeError, MemoryError, RecursionError):
            reply = {}
        replies.append(reply if isinstance(reply, dict) else {})
        offset += size
    for name, size in event.pop("files", []):
        files[name] = body[offset : offset + size]
        offset += size
    event["replies"], event["files"] = replies, files
    return event


def _caller_level() -> int:
    """The stack level of the first frame outside this package, for warnings to point at the user's call."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.dirname(frame.f_code.co_filename) == os.path.dirname(__file__):
        frame, level = frame.f_back, level + 1
    return level


def _shutdown(proc: subprocess.Popen, fds: list[int], workdir: str) -> None:
    """Kill a sandbox's process group and release what the host held for it (a weakref finalizer: runs once)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()
    # The code may have left directories without write or search permission; the host owns them and opens them up
    # again, never following a symlink it may have left as well.
    for directory, names, _ in os.walk(workdir):
        for name in names:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                os.chmod(path, 0o700)
    shutil.rmtree(workdir)


class Box:
    """One sandbox seen from the host: the process, its pipes, what it printed and what it reported."""

    def __init__(self, mode: str, limits: Limits, files: dict[str, bytes], code: str = "", stdin: str | None = None):
        if sys.platform != "linux":
            raise RuntimeError("qianwen.sandbox needs Linux (namespaces, prctl and /proc); run it on a Linux host.")
        self.limits, self.isolated, self.started, self.events = limits, False, False, []
        self.reset_output()
        # The private directory for runs without namespaces: made here, and removed here, whichever way the run
        # ends, also when the sandbox only finds out that it cannot use namespaces.
        workdir = tempfile.mkdtemp(prefix="qianwen-sandbox-")
        for d in ("work", "home", "tmp"):
            os.mkdir(os.path.join(workdir, d))
        config = {
            "mode": mode,
            "code": code,
            "limits": dataclasses.asdict(limits),
            "files": files,
            "site": [d for d in site.getsitepackages() if os.path.isdir(d)],
            "no_namespaces": _no_namespaces(),
            "workdir": workdir,
            "host_tasks": 0 if os.geteuid() == 0 or kernel_at_least(5, 14) else count_tasks(os.geteuid()),
        }
        to_child_r, self.to_child = os.pipe()
        self.from_child, from_child_w = os.pipe()
        stdin_file = None
        if stdin is not None:
            stdin_file = tempfile.TemporaryFile()
            stdin_file.write(stdin.encode("utf-8"))
            stdin_file.seek(0)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _BOOT, _MARKER, str(to_child_r), str(from_child_w)],
                stdin=stdin_file if stdin_file is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=_environment(),
                cwd="/",
                start_new_session=True,
                pass_fds=(to_child_r, from_child_w),
            )
        except BaseException:
            for fd in (self.to_child, self.from_child):
                os.close(fd)
            shutil.rmtree(workdir)
            raise
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
            if stdin_file is not None:
                stdin_file.close()
        self.out_fd, self.err_fd = self.proc.stdout.fileno(), self.proc.stderr.fileno()
        for fd in (self.out_fd, self.err_fd):
            with contextlib.suppress(OSError):  # fewer, larger reads when the code prints a lot
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)
        for fd in (self.to_child, self.from_child, self.out_fd, self.err_fd):
            os.set_blocking(fd, False)
        self.open = {self.from_child, self.out_fd, self.err_fd}
        self.frames = Frames(limits.returned_files_bytes + 8 * limits.output_bytes + (1 << 20))
        self.pending = bytearray(frame(marshal.dumps(config)))
        self._finalizer = weakref.finalize(self, _shutdown, self.proc, [self.to_child, self.from_child], workdir)

    @property
    def alive(self) -> bool:
        return self.from_child in self.open

    def send(self, request: dict) -> None:
        self.pending += frame(marshal.dumps(request))

    def wait_started(self, deadline: float) -> None:
        while not self.started:
            if not self.alive or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"The sandbox failed to start: {self.stderr.text()[-2000:] or 'no output'}")
            self._pump(deadline - time.monotonic())

    def next_event(self, deadline: float) -> dict | None:
        """The next message after "started" (which is handled here), {"event": "lost"} once the sandbox is gone,
        or None at the deadline."""
        while not self.events:
            if not self.alive:
                if not self.started:
                    self.wait_started(deadline)
                return {"event": "lost", "files": {}, "files_dropped": [], "replies": []}
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                return None
            self._pump(timeout)
        return self.events.pop(0)

    def _pump(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for I/O and handle it; whether anything was read."""
        writers = [self.to_child] if self.pending else []
        readable, writable, _ = select.select(list(self.open), writers, [], max(timeout, 0))
        if writable:
            try:
                del self.pending[: os.write(self.to_child, self.pending)]
            except BrokenPipeError:
                self.pending.clear()
        for fd in readable:
            try:
                data = os.read(fd, 1 << 20)
            except BlockingIOError:
                continue
            if not data:
                self.open.discard(fd)
            elif fd == self.out_fd:
                self.stdout.add(data)
            elif fd == self.err_fd:
                self.stderr.add(data)
            else:
                self._receive(data)
        return bool(readable)

    def _receive(self, data: bytes) -> None:
        self.frames.feed(data)
        for header, body in self.frames.ready:
            event = _decode(header, body)
            if event["event"] == "started":
                self._on_started(event)
            else:
                self.events.append(event)
        self.frames.ready.clear()

    def _on_started(self, event: dict) -> None:
        global _unavailable
        self.started, self.isolated = True, event["isolated"]
        messages = [f"qianwen.sandbox: {note}." for note in event["notes"]]
        if not self.isolated:
            if "QIANWEN_SANDBOX_NAMESPACES" not in event["reason"]:
                _unavailable = event["reason"]
            messages.insert(
                0,
                f"qianwen.sandbox runs code without namespaces: {event['reason']}. There is no network isolation, "
                "no read-only filesystem and no PID namespace; what remains is the wall-clock timeout (the whole "
                "process tree is killed), CPU, memory, process, file-size and open-file limits, a scrubbed "
                "environment and a private working directory.",
            )
        for message in messages:
            if message not in _warned:
                _warned.add(message)
                warnings.warn(message, RuntimeWarning, stacklevel=_caller_level())

    def drain(self) -> None:
        """Read what the pipes hold now, without waiting for more."""
        while self._pump(0):
            pass

    def finish(self, deadline: float) -> None:
        """Read stdout and stderr to their end, then reap the process."""
        while self.open & {self.out_fd, self.err_fd} and time.monotonic() < deadline:
            self._pump(deadline - time.monotonic())
        try:
            self.proc.wait(max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            self.kill()

    def reset_output(self) -> None:
        self.stdout, self.stderr = _Capture(self.limits.output_bytes), _Capture(self.limits.output_bytes)

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.drain()

    def close(self) -> None:
        self._finalizer()
        self.proc.stdout.close()
        self.proc.stderr.close()

    def result(
        self,
        status: str,
        start: float,
        *,
        notes: list[str] | None = None,
        limit: str | None = None,
        files: dict[str, bytes] | None = None,
        dropped: list[str] | None = None,
        restarted: bool = False,
    ) -> Result:
        return Result(
            status=status,
            stdout=self.stdout.text(),
            stderr=self.stderr.text() + "".join(f"\n[sandbox] {note}\n" for note in notes or []),
            limit=limit,
            duration=time.monotonic() - start,
            files=files or {},
            files_dropped=dropped or [],
            stdout_dropped=self.stdout.dropped,
            stderr_dropped=self.stderr.dropped,
            network_isolated=self.isolated,
            restarted=restarted,
        )

    def result_from_exit(self, event: dict, duration: float) -> Result:
        """A Result from the supervisor's report of how the code's process ended."""
        replies = event["replies"]
        hint = next((r.get("hint") for r in replies if r.get("hint") in LIMIT_NAMES), None)
        code, sig, cpu = event.get("code"), event.get("signal"), event.get("cpu", 0.0)
        limit = None
        if event.get("stopped"):
            status = "timeout"
        elif sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= 0.8 * self.limits.cpu_seconds):
            # SIGXCPU comes only from the CPU limit; SIGKILL from its hard limit, one second later, if the code
            # caught SIGXCPU. Under load rusage trails the clock the kernel checks the limit on (by 20% seen).
            status, limit = "limit", "cpu"
        elif sig == signal.SIGXFSZ:
            status, limit = "limit", "file_size"
        elif sig is not None:
            status = "killed"
        elif code == 0:
            status = "ok"
        elif hint:
            status, limit = "limit", hint
        else:
            status = "error"
        return Result(
            status=status,
            stdout=self.stdout.text(),
            stderr=self.stderr.text(),
            exit_code=code,
            signal=sig,
            limit=limit,
            duration=duration,
            files=event["files"],
            files_dropped=event["files_dropped"],
            stdout_dropped=self.stdout.dropped,
            stderr_dropped=self.stderr.dropped,
            completed=status == "ok" and any(r.get("completed") is True for r in replies),
            network_isolated=self.isolated,
        )
