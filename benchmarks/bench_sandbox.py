"""Sandbox overhead per call: start-to-result of `print(1)` through `qianwen.sandbox.run` against a plain
`subprocess.run([python, "-c", "print(1)"])` (goal: at most 1.5x), the median of --calls calls each, interleaved
so that load on the machine hits all of them alike. Also timed, to show where the time goes: the interpreter
started the way the sandbox starts it (`-I -S`, no namespaces, no supervisor), the sandbox with namespaces turned
off, and one call into a running `Session`.

    python -m benchmarks.bench_sandbox [--calls 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

from benchmarks.common import write_result
from qianwen import sandbox


def without_namespaces() -> None:
    os.environ["QIANWEN_SANDBOX_NAMESPACES"] = "0"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert sandbox.run("print(1)").stdout == "1\n"
    finally:
        del os.environ["QIANWEN_SANDBOX_NAMESPACES"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()

    python = [sys.executable, "-c", "print(1)"]
    session = sandbox.Session()
    probe = sandbox.run("print(1)")
    assert probe.stdout == "1\n" and probe.status == "ok"
    cases: dict[str, Callable[[], object]] = {
        "subprocess.run(python -c)": lambda: subprocess.run(python, capture_output=True, check=True),
        "qianwen sandbox.run": lambda: sandbox.run("print(1)"),
        "python -I -S -c (how the sandbox starts Python)": lambda: subprocess.run(
            [sys.executable, "-I", "-S", "-c", "print(1)"], capture_output=True, check=True
        ),
        "qianwen sandbox.run, namespaces off": without_namespaces,
        "qianwen Session.run (running interpreter)": lambda: session.run("print(1)"),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():  # warm-up: page cache, .pyc files
        fn()
    for _ in range(args.calls):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    session.close()

    baseline = statistics.median(times["subprocess.run(python -c)"])
    rows = []
    for name, samples in times.items():
        median = statistics.median(samples)
        rows.append(
            {
                "impl": name,
                "median_ms": round(median * 1000, 2),
                "p90_ms": round(sorted(samples)[int(0.9 * (len(samples) - 1))] * 1000, 2),
                "ratio_vs_subprocess": round(median / baseline, 2),
            }
        )
        print(f"{name:50s} {median * 1000:8.2f} ms  {median / baseline:5.2f}x")
    notes = (
        f"Median of {args.calls} interleaved calls each; sandbox runs with network isolation: "
        f"{probe.network_isolated}. The plain call imports site (and the .pth files of the environment), which the "
        "sandbox skips (-I -S, with site-packages added to sys.path); the sandbox then imports ctypes, sets up "
        "user, mount, network, PID and IPC namespaces with a read-only remount of every mount, and forks three "
        "times (helper, supervisor, worker)."
    )
    write_result("sandbox", rows, f"python -m benchmarks.bench_sandbox --calls {args.calls}", notes)


if __name__ == "__main__":
    main()
