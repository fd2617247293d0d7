"""The supervisor: the sandbox's first process (in a PID namespace, the one whose exit kills all the others)."""

from __future__ import annotations

import _signal
import marshal
import os
import select
import stat
import time

from .linux import (
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    NOBODY,
    PR_SET_CHILD_SUBREAPER,
    PR_SET_DUMPABLE,
    count_tasks,
    descendants,
    kernel_at_least,
    kill,
    mount,
    prctl,
)
from .namespaces import HOME, WORK, forbid_nested_user_namespaces, interpreter_dirs, write_inputs
from .protocol import Frames, frame, send, write_all
from .worker import worker


class Supervisor:
    """Starts the worker that runs the code, reaps every process, relays messages between the host and the worker,
    reports how the worker ended and the files it wrote, and kills everything when a run ends or the host asks.

    It never leaves its loop by an exception: the worker is forked from inside the loop and leaves by SystemExit
    through these same frames, so they hold no finally clauses."""

    def __init__(self, config: dict, ctl_in: int, ctl_out: int, reason: str | None) -> None:
        self.config, self.limits = config, config["limits"]
        self.ctl_in, self.ctl_out = ctl_in, ctl_out
        self.isolated = reason is None
        self.uid: int | None = None
        prctl(PR_SET_DUMPABLE, 0)  # the code may run as the same user: it must not ptrace or signal this process
        notes = []
        if self.isolated:
            self.work, self.home, self.tmp = WORK, HOME, "/tmp"
            self.nproc = self.limits["processes"] + 2  # the namespace helper and this process count too
            try:
                mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            except OSError as e:
                notes.append(f"/proc still lists the host's processes (mounting a fresh one failed: {e.strerror})")
            forbid_nested_user_namespaces()
            if not kernel_at_least(5, 14):
                # Before 5.14 the process limit counts all of the user's processes, not only the namespace's.
                self.nproc += config["host_tasks"]
        else:
            base = config["workdir"]  # made by the host for this case, even when namespaces were to be tried
            self.work, self.home, self.tmp = (os.path.join(base, d) for d in ("work", "home", "tmp"))
            write_inputs(self.work, config["files"])
            prctl(PR_SET_CHILD_SUBREAPER, 1)
            if os.geteuid() == 0:
                if _readable_by_others(interpreter_dirs(config["site"])) and _give_to(base, NOBODY):
                    self.uid = NOBODY
                else:
                    notes.append(
                        "the code runs as root (without capabilities), because the interpreter is not readable by "
                        "user nobody or nobody does not exist here, so the process limit does not hold and files "
                        "owned by root can be written"
                    )
            self.nproc = count_tasks(os.geteuid() if self.uid is None else self.uid) + self.limits["processes"]
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(wake_w, False)
        _signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        _signal.signal(_signal.SIGCHLD, _ignore)  # a handler, not SIG_IGN, which would reap without a status
        send(ctl_out, {"event": "started", "isolated": self.isolated, "reason": reason, "notes": notes})
        self.snapshot = _scan(self.work)
        self.ctl_frames = Frames(1 << 62)
        self.worker: int | None = None
        self.req_w = self.rep_r = -1
        self.rep_frames = Frames(4 * self.limits["output_bytes"] + (1 << 16))
        self.replies: list[bytes] = []
        self.ended: dict | None = None
        self.cell: int | None = None  # the session call running now, named in every report about it

    def spawn(self) -> None:
        req_r, self.req_w = os.pipe()
        self.rep_r, rep_w = os.pipe()
        self.rep_frames = Frames(self.rep_frames.limit)
        pid = os.fork()
        if pid == 0:
            worker(self, req_r, rep_w)
        os.close(req_r)
        os.close(rep_w)
        os.set_blocking(self.rep_r, False)
        self.worker, self.ended = pid, None

    def reap(self) -> bool:
        """Collect finished children; False once there are none left."""
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
            if pid == self.worker:
                code = os.waitstatus_to_exitcode(status)
                self.ended = {
                    "code": code if code >= 0 else None,
                    "signal": -code if code < 0 else None,
                    "cpu": usage.ru_utime + usage.ru_stime,
                }
                self.worker = None

    def kill_all(self) -> None:
        """Kill every process but this one and reap them all."""
        while True:
            # In a PID namespace, kill(-1) reaches every process in it but its first, this one.
            for pid in [-1] if self.isolated else descendants(os.getpid()):
                kill(pid)
            if not self.reap():
                return
            time.sleep(0.002)

    def read_replies(self, until_eof: bool) -> None:
        while self.rep_r >= 0:
            try:
                data = os.read(self.rep_r, 1 << 16)
            except BlockingIOError:
                if not until_eof:
                    return
                select.select([self.rep_r], [], [])
                continue
            if not data:
                os.close(self.rep_r)
                self.rep_r = -1
                return
            try:
                self.rep_frames.feed(data)
            except ValueError:  # the worker broke the protocol: stop listening; it is killed and reported
                os.close(self.rep_r)
                self.rep_r = -1
                self.kill_all()
                return
            self.replies += [header for header, _ in self.rep_frames.ready]
            self.rep_frames.ready.clear()

    def report(self, event: str, **fields: object) -> None:
        current = _scan(self.work)
        changed = sorted(p for p, sig in current.items() if self.snapshot.get(p) != sig)
        files, blobs, dropped, budget = [], [], [], self.limits["returned_files_bytes"]
        for name in changed:
            if current[name][0] > budget:
                dropped.append(name)
                continue
            try:
                fd = os.open(os.path.join(self.work, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue
            data = b""
            while len(data) <= budget and (chunk := os.read(fd, min(1 << 20, budget + 1 - len(data)))):
                data += chunk
            os.close(fd)
            if len(data) > budget:
                dropped.append(name)
                continue
            budget -= len(data)
            files.append([name, len(data)])
            blobs.append(data)
        self.snapshot = current
        message = {"event": event, **fields, "replies": [len(r) for r in self.replies], "files": files}
        message["files_dropped"] = dropped
        send(self.ctl_out, message, b"".join(self.replies) + b"".join(blobs))
        self.replies = []

    def finish_worker(self) -> dict:
        """After the worker ended or was told to: kill the rest, read all it said, return how it ended."""
        self.kill_all()
        self.read_replies(until_eof=True)
        if self.req_w >= 0:
            os.close(self.req_w)
            self.req_w = -1
        ended, self.ended = self.ended or {"code": None, "signal": _signal.SIGKILL, "cpu": 0.0}, None
        return ended

    def loop(self) -> None:
        session = self.config["mode"] == "session"
        self.spawn()
        while True:
            readers = [self.ctl_in, self.wake_r] + ([self.rep_r] if self.rep_r >= 0 else [])
            ready = select.select(readers, [], [])[0]
            if self.wake_r in ready:
                try:
                    while os.read(self.wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                self.reap()
            if self.rep_r in ready:
                self.read_replies(until_eof=False)
                if session and self.replies:
                    self.report("reply", cell=self.cell)
                    self.cell = None
            if self.worker is None and self.ended is not None:
                self.report("exit", stopped=False, cell=self.cell, **self.finish_worker())
                if not session:
                    os._exit(0)
                self.cell = None
                self.spawn()
            if self.ctl_in in ready:
                data = os.read(self.ctl_in, 1 << 16)
                if not data:  # the host is gone or done
                    self.kill_all()
                    os._exit(0)
                self.ctl_frames.feed(data)
                for header, _ in self.ctl_frames.ready:
                    self.handle(marshal.loads(header), session)
                self.ctl_frames.ready.clear()

    def handle(self, request: dict, session: bool) -> None:
        if request["op"] == "run":
            self.cell = request["cell"]
            try:
                write_all(self.req_w, frame(marshal.dumps(request)))
            except BrokenPipeError:
                return  # the worker just died; reaping it reports the call as ended
        elif not session:  # "stop": the run timed out
            self.report("exit", stopped=True, **self.finish_worker())
            os._exit(0)
        else:  # "stop": the call timed out; a fresh interpreter takes over the same files
            self.report("restarted", cell=self.cell, **self.finish_worker())
            self.cell = None
            self.spawn()


def _ignore(*_: object) -> None:
    pass


def _readable_by_others(directories: list[str]) -> bool:
    """Whether a user with no relation to the files' owners can reach these directories."""
    for directory in directories:
        path = directory
        while True:
            if not os.stat(path).st_mode & stat.S_IXOTH:
                return False
            if path == "/":
                break
            path = os.path.dirname(path)
    return True


def _give_to(base: str, uid: int) -> bool:
    """Make `uid` the owner of everything under `base`; False where that uid does not exist (unmapped)."""
    try:
        for directory, _, names in os.walk(base):
            for name in [directory, *(os.path.join(directory, n) for n in names)]:
                os.lchown(name, uid, uid)
    except OSError:
        return False
    return True


def _scan(root: str) -> dict[str, tuple[int, int]]:
    """Regular files under `root` (symlinks are not followed) -> (size, mtime in ns)."""
    found = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            try:
                info = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                found[os.path.relpath(path, root)] = (info.st_size, info.st_mtime_ns)
    return found
