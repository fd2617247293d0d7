"""The worker: the process that runs the code, with resource limits and no privileges, as a program (`run`) or
cell by cell (`Session`). It leaves only by SystemExit."""

from __future__ import annotations

import _signal
import builtins
import ctypes
import errno
import marshal
import os
import resource
import sys

from .linux import (
    CAPABILITY_VERSION_3,
    PR_CAP_AMBIENT,
    PR_CAP_AMBIENT_CLEAR_ALL,
    PR_CAPBSET_DROP,
    PR_SET_DUMPABLE,
    PR_SET_NO_NEW_PRIVS,
    PR_SET_PDEATHSIG,
    call,
    libc,
    prctl,
)
from .protocol import LIMIT_NAMES, Frames, frame, receive, send

TYPE_CHECKING = False  # not typing's: importing typing would cost the sandbox's start-up
if TYPE_CHECKING:
    from .supervisor import Supervisor

_TRACEBACK_FRAMES = 50


def worker(supervisor: Supervisor, req_r: int, rep_w: int) -> None:
    _signal.set_wakeup_fd(-1)
    _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
    prctl(PR_SET_DUMPABLE, 1)  # an ordinary process again (fork kept the supervisor's setting)
    if not supervisor.isolated:
        prctl(PR_SET_PDEATHSIG, _signal.SIGKILL)
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
        if libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), ctypes.c_ulong(0), ctypes.c_ulong(0), 0) != 0:
            break
    libc.prctl(PR_CAP_AMBIENT, ctypes.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL), ctypes.c_ulong(0), ctypes.c_ulong(0), 0)
    header = (ctypes.c_uint32 * 2)(CAPABILITY_VERSION_3, 0)
    call("capset", header, (ctypes.c_uint32 * 6)())
    prctl(PR_SET_NO_NEW_PRIVS, 1)


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
        tb = tb.tb_next  # hide the sandbox's own frames
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
    hints = {hint: frame(repr({"hint": hint}).encode()) for hint in (None, *LIMIT_NAMES)}
    completed = frame(repr({"completed": True}).encode())
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
    frames = Frames(1 << 62)
    while (message := receive(req_r, frames)) is not None:
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
        send(rep_w, reply)
    raise SystemExit(0)
