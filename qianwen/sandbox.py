"""Run untrusted Python (code a model wrote) in a separate process with OS-level isolation: the code interpreter
of the agent and the executor of HumanEval.

    result = run("print(sum(range(10)))", timeout=5)
    result.status, result.stdout             # "ok", "45\\n"
    run(program).passed                      # ran to its last line and exited 0 (not os._exit, not sys.exit)
    with Session() as s:                     # state kept across calls, like a notebook
        s.run("x = 6")
        s.run("x * 7").value                 # "42"

How a run is built (Linux only). The host starts the same interpreter in isolated mode without site
(`python -I -S`; the environment's site-packages are added to sys.path, so numpy and friends import, but no .pth
file runs) in a new session, with a scrubbed environment (PATH, LANG, thread counts, MPLBACKEND; nothing
inherited). That process forks a helper that enters new user, mount, network, PID and IPC namespaces. Inside:

- the whole mount tree is remounted read-only and nosuid; /tmp is a fresh tmpfs capped at `Limits.disk_bytes`
  that holds the working directory (/tmp/work) and HOME (/tmp/home) and vanishes with the run; /dev/shm is a
  small fresh tmpfs; /home, /root, /run and /var/tmp are hidden under empty read-only tmpfs, except the
  interpreter's own directories, which are bound back read-only; a fresh /proc shows only the sandbox;
- the network namespace has only a loopback device, and it is down: no TCP, no DNS, and no abstract Unix sockets
  of the host;
- the first process of the PID namespace is a small supervisor (this file); when it exits, the kernel kills
  everything in the namespace, so no process outlives a run, whatever session or process group it moved to;
- the code runs in a child of the supervisor with setrlimit limits (CPU, address space, processes, file size,
  open files, no core dumps), no capabilities, an empty bounding set and no_new_privs. When the host runs as
  root, the sandbox's user is mapped to `nobody` (65534), so the process limit holds (root is exempt from it)
  and host files are reached with nobody's permissions only.

The host reads stdout and stderr up to `Limits.output_bytes` each and counts the rest; on a timeout it asks the
supervisor to kill everything and report, and kills the whole process group itself if the supervisor does not
answer. Files the code creates or changes in its working directory come back in `Result.files`.

Without user namespaces (disabled by the kernel, a container's seccomp profile, or QIANWEN_SANDBOX_NAMESPACES=0),
the run says so once with a warning, `Result.network_isolated` is False, and what remains is: the wall-clock
timeout (the supervisor is then a child subreaper and kills the whole process tree, including processes that
left the process group), the resource limits, the scrubbed environment and a private temporary working directory.
Nothing then stops writes elsewhere or network access; as root the code runs as nobody if the interpreter is
readable by others (and nobody exists), and otherwise as root without capabilities, where the process limit does
not hold. Without namespaces, code in one session can read another session's files (same user, shared /tmp).
"""

from __future__ import annotations

import _signal  # not `signal`: that imports enum, a noticeable share of the sandboxed interpreter's start-up
import builtins
import ctypes
import errno
import marshal
import os
import resource
import select
import stat
import sys
import time

_MARKER = "qianwen-sandbox"  # argv[1] of every sandbox process, to tell them apart in `ps`
_LIMIT_NAMES = ("cpu", "memory", "processes", "file_size", "open_files", "disk")
_TRACEBACK_FRAMES = 50
_NOBODY = 65534
_HIDDEN = ("/home", "/root", "/run", "/tmp", "/var/tmp", "/dev/shm")
_WORK, _HOME = "/tmp/work", "/tmp/home"

_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
_CLONE_NEWPID, _CLONE_NEWNET = 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT = 0x1, 0x2, 0x4, 0x8, 0x20
_MS_NOATIME, _MS_NODIRATIME, _MS_BIND, _MS_REC = 0x400, 0x800, 0x1000, 0x4000
_MS_NOSYMFOLLOW, _MS_PRIVATE, _MS_RELATIME, _MS_STRICTATIME = 0x100, 0x40000, 0x200000, 0x1000000
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_CAPBSET_DROP = 1, 4, 24
_PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 36, 38, 47, 4
_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)


def _call(name: str, *args: object) -> int:
    result = getattr(_libc, name)(*args)
    if result == -1:
        code = ctypes.get_errno()
        raise OSError(code, f"{name}: {os.strerror(code)}")
    return result


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encode = lambda s: None if s is None else os.fsencode(s)
    _call("mount", encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data))


def _prctl(option: int, value: int) -> None:
    _call("prctl", option, ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))


# ---------------------------------------------------------------------------------------------------------------
# Messages. A frame is a 4-byte header length, an 8-byte body length, the header and the body. The host sends
# marshal headers (the sandbox trusts the host); the sandbox sends repr() headers, which the host reads with
# ast.literal_eval and never unmarshals, and raw bytes (files) in the body. The sandboxed side imports neither
# json nor ast, to start fast.


def _frame(header: bytes, body: bytes = b"") -> bytes:
    return len(header).to_bytes(4, "big") + len(body).to_bytes(8, "big") + header + body


class _Frames:
    """Cuts a byte stream into (header, body) frames; a frame over `limit` bytes is a protocol error."""

    def __init__(self, limit: int) -> None:
        self.buffer = bytearray()
        self.limit = limit
        self.ready: list[tuple[bytes, bytes]] = []

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 12:
            head, body = int.from_bytes(self.buffer[:4], "big"), int.from_bytes(self.buffer[4:12], "big")
            if head + body > self.limit:
                raise ValueError(f"a {head + body}-byte message exceeds the {self.limit}-byte limit")
            if len(self.buffer) < 12 + head + body:
                return
            self.ready.append((bytes(self.buffer[12 : 12 + head]), bytes(self.buffer[12 + head : 12 + head + body])))
            del self.buffer[: 12 + head + body]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _receive(fd: int, frames: _Frames) -> tuple[bytes, bytes] | None:
    """The next frame from a blocking fd, or None at end of file."""
    while not frames.ready:
        data = os.read(fd, 1 << 16)
        if not data:
            return None
        frames.feed(data)
    return frames.ready.pop(0)


def _send(fd: int, message: dict, body: bytes = b"") -> None:
    _write_all(fd, _frame(repr(message).encode(), body))


# ---------------------------------------------------------------------------------------------------------------
# The sandboxed side: everything below up to the host half runs in the sandbox's processes.


def _child_main() -> None:
    """Entry point of the sandbox's first process (argv: marker, control fd in, control fd out)."""
    ctl_in, ctl_out = int(sys.argv[2]), int(sys.argv[3])
    sys.modules.pop("sandbox", None)  # the user's `import sandbox` must not find this file
    sys.path.remove(os.path.dirname(__file__))
    header, _ = _receive(ctl_in, _Frames(1 << 62))
    config = marshal.loads(header)
    sys.path.extend(config["site"])
    reason = config["no_namespaces"]
    if reason is None:
        reason = _enter_namespaces(config, (ctl_in, ctl_out))
    _Supervisor(config, ctl_in, ctl_out, reason).loop()


def _enter_namespaces(config: dict, ctl_fds: tuple[int, int]) -> str | None:
    """Fork a helper into new namespaces. Returns None in the PID namespace's first process (the supervisor to be),
    or, in this process, why the namespaces could not be set up; this process otherwise waits and exits."""
    up_r, up_w = os.pipe()
    down_r, down_w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(up_r)
        os.close(down_w)
        _namespace_helper(config, parent, up_w, down_r, ctl_fds)
        return None
    os.close(up_w)
    os.close(down_r)
    failure = ""
    if os.read(up_r, 1) == b"u":
        try:
            _write_id_maps(pid)
        except OSError as e:
            failure = f"mapping user ids into a user namespace failed ({e})"
        os.write(down_w, b"x" if failure else b"m")
    os.close(down_w)
    answer = b""
    while chunk := os.read(up_r, 4096):
        answer += chunk
    os.close(up_r)
    if answer == b"ok":
        for fd in ctl_fds:
            os.close(fd)
        os.waitpid(pid, 0)
        os._exit(0)
    os.waitpid(pid, 0)
    return failure or answer.decode(errors="replace") or "the namespace helper exited unexpectedly"


def _write_id_maps(pid: int) -> None:
    # Root maps the sandbox's root to nobody, so the process limit applies (the kernel exempts root from it) and
    # host files are reached with nobody's permissions. Anyone else can only map their own ids.
    if os.geteuid() == 0:
        uid = gid = _NOBODY
    else:
        uid, gid = os.geteuid(), os.getegid()
        _write_file(f"/proc/{pid}/setgroups", "deny")
    _write_file(f"/proc/{pid}/uid_map", f"0 {uid} 1")
    _write_file(f"/proc/{pid}/gid_map", f"0 {gid} 1")


def _write_file(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _namespace_helper(config: dict, parent: int, up: int, down: int, ctl_fds: tuple[int, int]) -> None:
    """Enter the namespaces, build the filesystem view, then fork the PID namespace's first process, which returns
    from here to become the supervisor; this process waits for it."""
    _prctl(_PR_SET_PDEATHSIG, _signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)
    try:
        _call("unshare", _CLONE_NEWUSER | _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWIPC)
    except OSError as e:
        os.write(up, f"fthe kernel refused new user, mount, network and PID namespaces ({e.strerror})".encode())
        os._exit(0)
    os.write(up, b"u")
    if os.read(down, 1) != b"m":
        os._exit(0)
    try:
        _build_filesystem(config)
    except OSError as e:
        os.write(up, f"building the sandbox's read-only filesystem failed ({e})".encode())
        os._exit(0)
    os.write(up, b"ok")
    os.close(up)
    os.close(down)
    pid = os.fork()
    if pid == 0:
        # No check that the parent is still there: from inside the PID namespace it is invisible (getppid() is 0),
        # and the host kills the whole process group anyway.
        _prctl(_PR_SET_PDEATHSIG, _signal.SIGKILL)
        return
    for fd in ctl_fds:
        os.close(fd)
    os.waitpid(pid, 0)
    os._exit(0)


def _interpreter_dirs(site: list[str]) -> list[str]:
    """The directories the interpreter and its packages live in, outermost only."""
    found = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *site}
    found.add(os.path.dirname(os.path.realpath(sys.executable)))
    real = {os.path.realpath(d) for d in found if os.path.isdir(d)}
    return sorted(d for d in real if not any(d != o and _inside(d, o) for o in real))


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _build_filesystem(config: dict) -> None:
    limits = config["limits"]
    hidden = [d for d in _HIDDEN if os.path.isdir(d) and not os.path.islink(d)]
    needed = [d for d in _interpreter_dirs(config["site"]) if any(_inside(d, h) for h in hidden)]
    # Opened now, while this process still has the host's uid and can reach them (/root is often 0700).
    exposed = {d: os.open(d, os.O_PATH | os.O_DIRECTORY) for d in needed}
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    _remount_all_readonly()
    with open("/proc/self/setgroups") as f:
        if f.read().strip() == "allow":  # only when root wrote the id maps; others had to deny setgroups
            os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)  # from here files are created as the namespace's root (the host's nobody, or the user)
    for d in hidden:
        if d == "/tmp":
            options = f"size={limits['disk_bytes']},nr_inodes={max(limits['disk_bytes'] // 4096, 1024)},mode=0755"
        elif d == "/dev/shm":
            options = f"size={limits['file_size_bytes']},nr_inodes=4096,mode=1777"
        else:
            options = "size=1m,nr_inodes=1024,mode=0755"
        _mount("tmpfs", d, "tmpfs", _MS_NOSUID | _MS_NODEV, options)
    for d, fd in exposed.items():
        os.makedirs(d, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", d, None, _MS_BIND | _MS_REC)
        os.close(fd)
    for d in hidden:
        if d not in ("/tmp", "/dev/shm"):
            _mount(None, d, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    for d in (_WORK, _HOME):
        os.mkdir(d)
    _write_inputs(_WORK, config["files"])


def _remount_all_readonly() -> None:
    """Every mount read-only and nosuid. A remount replaces all of a mount's flags, and in a user namespace the
    kernel refuses to change nodev, noexec or the atime mode, so those are passed on as they are."""
    with open("/proc/self/mountinfo", "rb") as f:
        lines = f.read().splitlines()
    keep = ((b"nodev", _MS_NODEV), (b"noexec", _MS_NOEXEC), (b"nosymfollow", _MS_NOSYMFOLLOW))
    keep += ((b"noatime", _MS_NOATIME), (b"nodiratime", _MS_NODIRATIME), (b"relatime", _MS_RELATIME))
    for line in lines:
        fields = line.split()
        target = os.fsdecode(fields[4].decode("unicode_escape").encode("latin-1"))  # mountinfo escapes as \040
        options = fields[5].split(b",")
        flags = _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID
        for name, bit in keep:
            if name in options:
                flags |= bit
        if b"relatime" not in options and b"noatime" not in options:
            flags |= _MS_STRICTATIME  # mountinfo shows no option for it; without the flag, remount means relatime
        try:
            _mount(None, target, None, flags)
        except OSError as e:
            # A mount point that no longer resolves (deleted, or under another mount) is out of reach anyway.
            if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                raise


def _write_inputs(work: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = os.path.join(work, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


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


def _count_tasks(uid: int) -> int:
    """Threads owned by `uid` on the host: RLIMIT_NPROC counts them all when there is no user namespace."""
    count = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{name}/task"))
            except OSError:
                continue
    return count


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


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


def _forbid_nested_user_namespaces() -> None:
    # Nested namespaces could not undo the locked read-only mounts anyway; this takes away the kernel surface that
    # a namespace with full capabilities opens. Best effort: it needs the fresh /proc.
    try:
        _write_file("/proc/sys/user/max_user_namespaces", "0")
    except OSError:
        return


def _ignore(*_: object) -> None:
    pass


def _kill(pid: int) -> None:
    """SIGKILL a process that may be gone already."""
    try:
        os.kill(pid, _signal.SIGKILL)
    except ProcessLookupError:
        return


class _Supervisor:
    """Starts the worker that runs the code, reaps every process, relays messages between the host and the worker,
    reports how the worker ended and the files it wrote, and kills everything when a run ends or the host asks.

    It never leaves its loop by an exception: the worker is forked from inside the loop and leaves by SystemExit
    through these same frames, so they hold no finally clauses."""

    def __init__(self, config: dict, ctl_in: int, ctl_out: int, reason: str | None) -> None:
        self.config, self.limits = config, config["limits"]
        self.ctl_in, self.ctl_out = ctl_in, ctl_out
        self.isolated = reason is None
        self.uid: int | None = None
        _prctl(_PR_SET_DUMPABLE, 0)  # the code may run as the same user: it must not ptrace or signal this process
        notes = []
        if self.isolated:
            self.work, self.home, self.tmp = _WORK, _HOME, "/tmp"
            self.nproc = self.limits["processes"] + 2  # the namespace helper and this process count too
            try:
                _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
            except OSError as e:
                notes.append(f"/proc still lists the host's processes (mounting a fresh one failed: {e.strerror})")
            _forbid_nested_user_namespaces()
            if not _kernel_at_least(5, 14):
                # Before 5.14 the process limit counts all of the user's processes, not only the namespace's.
                self.nproc += config["host_tasks"]
        else:
            base = config["workdir"]  # made by the host for this case, even when namespaces were to be tried
            self.work, self.home, self.tmp = (os.path.join(base, d) for d in ("work", "home", "tmp"))
            _write_inputs(self.work, config["files"])
            _prctl(_PR_SET_CHILD_SUBREAPER, 1)
            if os.geteuid() == 0:
                if _readable_by_others(_interpreter_dirs(config["site"])) and _give_to(base, _NOBODY):
                    self.uid = _NOBODY
                else:
                    notes.append(
                        "the code runs as root (without capabilities), because the interpreter is not readable by "
                        "user nobody or nobody does not exist here, so the process limit does not hold and files "
                        "owned by root can be written"
                    )
            self.nproc = _count_tasks(os.geteuid() if self.uid is None else self.uid) + self.limits["processes"]
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(wake_w, False)
        _signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        _signal.signal(_signal.SIGCHLD, _ignore)  # a handler, not SIG_IGN, which would reap without a status
        _send(ctl_out, {"event": "started", "isolated": self.isolated, "reason": reason, "notes": notes})
        self.snapshot = _scan(self.work)
        self.ctl_frames = _Frames(1 << 62)
        self.worker: int | None = None
        self.req_w = self.rep_r = -1
        self.rep_frames = _Frames(4 * self.limits["output_bytes"] + (1 << 16))
        self.replies: list[bytes] = []
        self.ended: dict | None = None
        self.cell: int | None = None  # the session call running now, named in every report about it

    def spawn(self) -> None:
        req_r, self.req_w = os.pipe()
        self.rep_r, rep_w = os.pipe()
        self.rep_frames = _Frames(self.rep_frames.limit)
        pid = os.fork()
        if pid == 0:
            _worker(self, req_r, rep_w)
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
            for pid in [-1] if self.isolated else _descendants(os.getpid()):
                _kill(pid)
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
        _send(self.ctl_out, message, b"".join(self.replies) + b"".join(blobs))
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
                _write_all(self.req_w, _frame(marshal.dumps(request)))
            except BrokenPipeError:
                return  # the worker just died; reaping it reports the call as ended
        elif not session:  # "stop": the run timed out
            self.report("exit", stopped=True, **self.finish_worker())
            os._exit(0)
        else:  # "stop": the call timed out; a fresh interpreter takes over the same files
            self.report("restarted", cell=self.cell, **self.finish_worker())
            self.cell = None
            self.spawn()


def _kernel_at_least(major: int, minor: int) -> bool:
    release = os.uname().release.split(".")
    return (int(release[0]), int("".join(c for c in release[1] if c.isdigit()) or 0)) >= (major, minor)


def _worker(supervisor: _Supervisor, req_r: int, rep_w: int) -> None:
    """The process that runs the code: limits, no privileges, then the code. Leaves only by SystemExit."""
    _signal.set_wakeup_fd(-1)
    _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
    _prctl(_PR_SET_DUMPABLE, 1)  # an ordinary process again (fork kept the supervisor's setting)
    if not supervisor.isolated:
        _prctl(_PR_SET_PDEATHSIG, _signal.SIGKILL)
    keep = sorted({0, 1, 2, req_r, rep_w})
    for low, high in zip(keep, [*keep[1:], 1 << 20]):
        os.closerange(low + 1, high)
    os.chdir(supervisor.work)
    os.environ.update(HOME=supervisor.home, TMPDIR=supervisor.tmp)
    os.umask(0o022)
    limits = supervisor.limits
    for which, soft, hard in (
        (resource.RLIMIT_AS, limits["memory_bytes"], limits["memory_bytes"]),
        (resource.RLIMIT_CPU, limits["cpu_seconds"], limits["cpu_seconds"] + 1),
        (resource.RLIMIT_NPROC, supervisor.nproc, supervisor.nproc),
        (resource.RLIMIT_FSIZE, limits["file_size_bytes"], limits["file_size_bytes"]),
        (resource.RLIMIT_NOFILE, limits["open_files"], limits["open_files"]),
        (resource.RLIMIT_CORE, 0, 0),
    ):
        ceiling = resource.getrlimit(which)[1]  # without privileges a hard limit can only go down
        if ceiling != resource.RLIM_INFINITY:
            soft, hard = min(soft, ceiling), min(hard, ceiling)
        resource.setrlimit(which, (soft, hard))
    if supervisor.uid is not None:
        os.setgroups([])
        os.setresgid(supervisor.uid, supervisor.uid, supervisor.uid)
        os.setresuid(supervisor.uid, supervisor.uid, supervisor.uid)
    _drop_capabilities()
    # site (skipped by -S) would have added these; model-written code calls them.
    builtins.exit = builtins.quit = sys.exit
    sys.stdout.reconfigure(line_buffering=True)  # what was printed before a kill must reach the host
    sys.stderr.reconfigure(line_buffering=True)
    if supervisor.config["mode"] == "run":
        _run_program(supervisor.config["code"], rep_w)
    _serve(req_r, rep_w, limits["output_bytes"])


def _drop_capabilities() -> None:
    for cap in range(64):  # until the first cap the kernel does not know, or at once without CAP_SETPCAP
        if _libc.prctl(_PR_CAPBSET_DROP, ctypes.c_ulong(cap), ctypes.c_ulong(0), ctypes.c_ulong(0), 0) != 0:
            break
    _libc.prctl(_PR_CAP_AMBIENT, ctypes.c_ulong(_PR_CAP_AMBIENT_CLEAR_ALL), ctypes.c_ulong(0), ctypes.c_ulong(0), 0)
    header = (ctypes.c_uint32 * 2)(_CAPABILITY_VERSION_3, 0)
    _call("capset", header, (ctypes.c_uint32 * 6)())
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)


def _limit_hint(error: BaseException) -> str | None:
    """Which limit, if any, an exception that ended the code points to."""
    if isinstance(error, MemoryError):
        return "memory"
    if isinstance(error, OSError):
        by_errno = {errno.EFBIG: "file_size", errno.EMFILE: "open_files", errno.ENOSPC: "disk"}
        return by_errno.get(error.errno, "processes" if error.errno == errno.EAGAIN else None)
    if isinstance(error, RuntimeError) and "can't start new thread" in str(error):
        return "processes"
    return None


def _print_exception(error: BaseException, filename: str, source: str) -> None:
    import linecache  # only on errors: the happy path should not pay for these imports
    import traceback

    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    tb = error.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next  # hide this file's frames
    # The innermost frames only: a recursion a million deep must not need memory it no longer has to print.
    traceback.print_exception(type(error), error, tb, limit=-_TRACEBACK_FRAMES)


def _new_main() -> dict:
    main = type(sys)("__main__")
    sys.modules["__main__"] = main
    return main.__dict__


def _run_program(source: str, rep_w: int) -> None:
    """Run the code like `python -c`. Reports "completed" only when the code's last line ran."""
    sys.argv = ["-c"]
    namespace = _new_main()
    # Built before the code runs: after a MemoryError even a small dict may not fit.
    hints = {hint: _frame(repr({"hint": hint}).encode()) for hint in (None, *_LIMIT_NAMES)}
    completed = _frame(repr({"completed": True}).encode())
    try:
        exec(compile(source, "<string>", "exec"), namespace)
    except SystemExit:
        raise
    except BaseException as e:
        os.write(rep_w, hints[_limit_hint(e)])
        _print_exception(e, "<string>", source)
        raise SystemExit(1) from None
    os.write(rep_w, completed)
    raise SystemExit(0)


def _serve(req_r: int, rep_w: int, output_bytes: int) -> None:
    """Run cells sent by the supervisor, one at a time, in one namespace, like a notebook kernel."""
    import ast  # a session parses cells to return the last expression's value

    namespace = _new_main()
    frames = _Frames(1 << 62)
    while (message := _receive(req_r, frames)) is not None:
        request = marshal.loads(message[0])
        source, filename = request["code"], f"<cell {request['cell']}>"
        reply: dict = {"status": "ok", "value": None, "hint": None}
        try:
            tree = ast.parse(source, filename)
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            exec(compile(tree, filename, "exec"), namespace)
            if last is not None:
                value = eval(compile(ast.Expression(last.value), filename, "eval"), namespace)
                if value is not None:
                    namespace["_"] = value
                    reply["value"] = repr(value)[:output_bytes]
        except BaseException as e:  # SystemExit too: exit() in a cell must not end the session
            reply.update(status="error", hint=_limit_hint(e))
            _print_exception(e, filename, source)
        sys.stdout.flush()
        sys.stderr.flush()
        _send(rep_w, reply)
    raise SystemExit(0)


if __name__ == "sandbox" and sys.argv[1:2] == [_MARKER]:
    # The sandboxed interpreter loads this file as `sandbox` and stops here: it never imports what the host half
    # below needs (dataclasses, subprocess, ...), which would double its start-up time.
    _child_main()


# ---------------------------------------------------------------------------------------------------------------
# The host half.

import ast  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import fcntl  # noqa: E402
import shutil  # noqa: E402
import site  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
import weakref  # noqa: E402

_BOOT = f"import sys; sys.path.append({os.path.dirname(os.path.abspath(__file__))!r}); import sandbox"
_GRACE = 2.0  # seconds the supervisor gets to stop the code and report before the host kills the process group
_START = 60.0  # seconds a sandbox may take to start, generous for a loaded machine
_unavailable: str | None = None  # why namespaces failed, once they have, so later runs do not retry
_warned: set[str] = set()


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
    _check_code(code)
    _check_timeout(timeout)
    limits = limits or Limits()
    files = _check_files(files, limits)
    if stdin is not None and not isinstance(stdin, str):
        raise ValueError(f"stdin must be a string, got {type(stdin).__name__}.")
    start = time.monotonic()
    box = _Box("run", limits, files, code=code, stdin=stdin)
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
                deadline = time.monotonic() + _GRACE
            elif event["event"] == "lost":
                return box.result("timeout" if stopped else "killed", start)
            elif event["event"] == "exit":
                duration = time.monotonic() - start
                box.finish(time.monotonic() + _GRACE)
                return box.result_from_exit(event, duration)
    finally:
        box.close()


class Session:
    """A Python interpreter kept alive across calls in one sandbox, like a notebook kernel: variables persist,
    and when a call's last statement is an expression its repr() comes back as `Result.value`. Each call has its
    own timeout; a timeout or crash restarts the interpreter (variables are lost, files in the working directory
    are kept) and the result says so. Sessions share nothing with each other."""

    def __init__(self, *, limits: Limits | None = None, files: dict[str, bytes] | None = None) -> None:
        self.limits = limits or Limits()
        self._files = _check_files(files, self.limits)
        self._cells = 0
        self._box: _Box | None = None
        self._closed = False
        self._start()

    def _start(self) -> _Box:
        self._box = _Box("session", self.limits, self._files)
        self._box.wait_started(time.monotonic() + _START)
        return self._box

    @property
    def network_isolated(self) -> bool:
        return self._box is not None and self._box.isolated

    def run(self, code: str, *, timeout: float = 10.0) -> Result:
        """Run one cell; the timeout counts from the call."""
        _check_code(code)
        _check_timeout(timeout)
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
                deadline = time.monotonic() + _GRACE
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
                limit = reply.get("hint") if reply.get("hint") in _LIMIT_NAMES else None
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


def _check_code(code: object) -> None:
    if not isinstance(code, str):
        raise ValueError(f"code must be a string of Python source, got {type(code).__name__}.")


def _check_timeout(timeout: object) -> None:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}.")


def _check_files(files: dict[str, bytes] | None, limits: Limits) -> dict[str, bytes]:
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
    """The stack level of the first frame outside this file, for warnings to point at the user's call."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    return level


def _shutdown(proc: subprocess.Popen, fds: list[int], workdir: str) -> None:
    """Kill a sandbox's process group and release what the host held for it (a weakref finalizer: runs once)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, _signal.SIGKILL)
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


class _Box:
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
            "host_tasks": 0 if os.geteuid() == 0 or _kernel_at_least(5, 14) else _count_tasks(os.geteuid()),
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
        self.frames = _Frames(limits.returned_files_bytes + 8 * limits.output_bytes + (1 << 20))
        self.pending = bytearray(_frame(marshal.dumps(config)))
        self._finalizer = weakref.finalize(self, _shutdown, self.proc, [self.to_child, self.from_child], workdir)

    @property
    def alive(self) -> bool:
        return self.from_child in self.open

    def send(self, request: dict) -> None:
        self.pending += _frame(marshal.dumps(request))

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
                os.killpg(self.proc.pid, _signal.SIGKILL)
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
        hint = next((r.get("hint") for r in replies if r.get("hint") in _LIMIT_NAMES), None)
        code, sig, cpu = event.get("code"), event.get("signal"), event.get("cpu", 0.0)
        limit = None
        if event.get("stopped"):
            status = "timeout"
        elif sig == _signal.SIGXCPU or (sig == _signal.SIGKILL and cpu >= 0.8 * self.limits.cpu_seconds):
            # SIGXCPU comes only from the CPU limit; SIGKILL from its hard limit, one second later, if the code
            # caught SIGXCPU. Under load rusage trails the clock the kernel checks the limit on (by 20% seen).
            status, limit = "limit", "cpu"
        elif sig == _signal.SIGXFSZ:
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
