"""Entering the sandbox's user, mount, network, PID and IPC namespaces, and building its view of the filesystem:
every mount read-only and nosuid, a fresh tmpfs for /tmp (the working directory and HOME) and /dev/shm, and the
directories that hold private data hidden, except those the interpreter needs."""

from __future__ import annotations

import _signal
import errno
import os
import sys

from .linux import (
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUSER,
    MS_BIND,
    MS_NOATIME,
    MS_NODEV,
    MS_NODIRATIME,
    MS_NOEXEC,
    MS_NOSUID,
    MS_NOSYMFOLLOW,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_RELATIME,
    MS_REMOUNT,
    MS_STRICTATIME,
    NOBODY,
    PR_SET_PDEATHSIG,
    call,
    mount,
    prctl,
    write_file,
)

HIDDEN = ("/home", "/root", "/run", "/tmp", "/var/tmp", "/dev/shm")
WORK, HOME = "/tmp/work", "/tmp/home"


def enter_namespaces(config: dict, ctl_fds: tuple[int, int]) -> str | None:
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
        uid = gid = NOBODY
    else:
        uid, gid = os.geteuid(), os.getegid()
        write_file(f"/proc/{pid}/setgroups", "deny")
    write_file(f"/proc/{pid}/uid_map", f"0 {uid} 1")
    write_file(f"/proc/{pid}/gid_map", f"0 {gid} 1")


def _namespace_helper(config: dict, parent: int, up: int, down: int, ctl_fds: tuple[int, int]) -> None:
    """Enter the namespaces, build the filesystem view, then fork the PID namespace's first process, which returns
    from here to become the supervisor; this process waits for it."""
    prctl(PR_SET_PDEATHSIG, _signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)
    try:
        call("unshare", CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC)
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
        prctl(PR_SET_PDEATHSIG, _signal.SIGKILL)
        return
    for fd in ctl_fds:
        os.close(fd)
    os.waitpid(pid, 0)
    os._exit(0)


def interpreter_dirs(site: list[str]) -> list[str]:
    """The directories the interpreter and its packages live in, outermost only."""
    found = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *site}
    found.add(os.path.dirname(os.path.realpath(sys.executable)))
    real = {os.path.realpath(d) for d in found if os.path.isdir(d)}
    return sorted(d for d in real if not any(d != o and _inside(d, o) for o in real))


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _build_filesystem(config: dict) -> None:
    limits = config["limits"]
    hidden = [d for d in HIDDEN if os.path.isdir(d) and not os.path.islink(d)]
    needed = [d for d in interpreter_dirs(config["site"]) if any(_inside(d, h) for h in hidden)]
    # Opened now, while this process still has the host's uid and can reach them (/root is often 0700).
    exposed = {d: os.open(d, os.O_PATH | os.O_DIRECTORY) for d in needed}
    mount(None, "/", None, MS_REC | MS_PRIVATE)
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
        mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, options)
    for d, fd in exposed.items():
        os.makedirs(d, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", d, None, MS_BIND | MS_REC)
        os.close(fd)
    for d in hidden:
        if d not in ("/tmp", "/dev/shm"):
            mount(None, d, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    for d in (WORK, HOME):
        os.mkdir(d)
    write_inputs(WORK, config["files"])


def _remount_all_readonly() -> None:
    """Every mount read-only and nosuid. A remount replaces all of a mount's flags, and in a user namespace the
    kernel refuses to change nodev, noexec or the atime mode, so those are passed on as they are."""
    with open("/proc/self/mountinfo", "rb") as f:
        lines = f.read().splitlines()
    keep = ((b"nodev", MS_NODEV), (b"noexec", MS_NOEXEC), (b"nosymfollow", MS_NOSYMFOLLOW))
    keep += ((b"noatime", MS_NOATIME), (b"nodiratime", MS_NODIRATIME), (b"relatime", MS_RELATIME))
    for line in lines:
        fields = line.split()
        target = os.fsdecode(fields[4].decode("unicode_escape").encode("latin-1"))  # mountinfo escapes as \040
        options = fields[5].split(b",")
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID
        for name, bit in keep:
            if name in options:
                flags |= bit
        if b"relatime" not in options and b"noatime" not in options:
            flags |= MS_STRICTATIME  # mountinfo shows no option for it; without the flag, remount means relatime
        try:
            mount(None, target, None, flags)
        except OSError as e:
            # A mount point that no longer resolves (deleted, or under another mount) is out of reach anyway.
            if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                raise


def write_inputs(work: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = os.path.join(work, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def forbid_nested_user_namespaces() -> None:
    # Nested namespaces could not undo the locked read-only mounts anyway; this takes away the kernel surface that
    # a namespace with full capabilities opens. Best effort: it needs the fresh /proc.
    try:
        write_file("/proc/sys/user/max_user_namespaces", "0")
    except OSError:
        return
