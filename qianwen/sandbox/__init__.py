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
- the first process of the PID namespace is a small supervisor (inside/supervisor.py); when it exits, the
  kernel kills everything in the namespace, so no process outlives a run, whatever session or process group it
  moved to;
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

from .limits import Limits
from .program import run
from .result import Result
from .session import Session

__all__ = ["Limits", "Result", "Session", "run"]
