"""The serving engine in a process of its own, behind the same interface as `qianwen.engine.Engine`.

In one process the HTTP server's event loop and the decoding thread share Python's GIL: every time the loop
writes a token to a client, the decoding step waits for the lock, and under 16 streaming clients a step took
14 ms in the server against 10 ms alone. Here the child process owns the model (loaded from its directory, so
the server holds no second copy), the KV cache and the decoding loop; the server sends it requests and
cancellations through one pipe and reads each step's tokens from another, on a thread that hands them to the
event loop as the in-process engine does. The server keeps the request count itself, so a full engine still
answers 429 at once.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp

from qianwen.engine import Event, Overloaded, Params, check_request, hand_over


@dataclass
class ModelSource:
    """Where the child loads the model from (`qianwen.load` arguments)."""

    path: str
    dtype: torch.dtype | None = None
    device: str | None = None


class RemoteJob:
    """One choice generated in the engine process; what the server reads of a `qianwen.engine.Job`."""

    def __init__(self, engine: EngineProcess, rid: int, index: int, emit: Callable[[Event], None]):
        self._engine, self.rid, self.index, self.emit = engine, rid, index, emit
        self.cancelled = False
        self.generated = 0  # tokens of the reply so far

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._engine._cancel(self)


class EngineProcess:
    def __init__(
        self,
        source: ModelSource,
        max_batch: int = 8,
        max_queue: int = 64,
        max_len: int | None = None,
        prefix_cache_bytes: int | None = None,
        start_timeout: float = 600,
    ):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}.")
        context = mp.get_context("spawn")
        commands_in, self._commands = context.Pipe(duplex=False)
        self._events, events_out = context.Pipe(duplex=False)
        args = (source, max_batch, max_len, prefix_cache_bytes, torch.get_num_threads(), commands_in, events_out)
        self._process = context.Process(target=_child, args=args, name="qianwen-engine", daemon=True)
        self._process.start()
        commands_in.close()
        events_out.close()
        if not self._events.poll(start_timeout):
            self._process.kill()
            raise ValueError(f"the engine process did not start within {start_timeout:.0f} s.")
        try:
            hello = self._events.recv()
        except (EOFError, OSError):
            self._process.join(timeout=30)
            raise ValueError(f"the engine process exited while starting (code {self._process.exitcode}).") from None
        if "error" in hello:
            self._process.join(timeout=30)
            raise ValueError(hello["error"])
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_len, self.cache_bytes, self.prefix_budget = hello["max_len"], hello["cache_bytes"], hello["prefix"]
        self.deliver: Callable[[list[tuple[RemoteJob, Event]]], None] | None = None
        self._jobs: dict[int, RemoteJob] = {}  # submitted, not yet finished or cancelled
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._load: dict = hello["load"]
        self._closing = False
        self._reader = threading.Thread(target=self._read, name="qianwen-engine-events", daemon=True)
        self._reader.start()

    def submit(
        self, prompt: Sequence[int], params: Params, n: int, emit: Callable[[RemoteJob, Event], None]
    ) -> list[RemoteJob]:
        """Queue `n` choices for one prompt; `emit(job, event)` receives each step's output (as Engine.submit)."""
        check_request(prompt, params, n, self.max_batch, self.max_len)
        with self._lock:
            if self._closing or not self._process.is_alive():
                raise Overloaded("the engine process is not running.")
            if len(self._jobs) + n > self.max_batch + self.max_queue:
                raise Overloaded(
                    f"all {self.max_batch} batch rows are busy and {len(self._jobs) - self.max_batch} choices are "
                    f"queued (the limit is {self.max_queue}); retry later."
                )
            jobs = [RemoteJob(self, next(self._ids), i, None) for i in range(n)]
            for job in jobs:
                job.emit = lambda event, job=job: emit(job, event)
                self._jobs[job.rid] = job
            self._commands.send(("submit", [job.rid for job in jobs], list(prompt), params))
        return jobs

    @property
    def alive(self) -> bool:
        """Whether the engine process still runs (the server's /health says so)."""
        return self._process.is_alive() and not self._closing

    @property
    def load(self) -> dict:
        return {**self._load, "max_batch": self.max_batch}

    def close(self) -> None:
        with self._lock:
            self._closing = True
            with contextlib.suppress(BrokenPipeError, OSError):
                self._commands.send(("close",))
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
        self._reader.join(timeout=30)

    def _cancel(self, job: RemoteJob) -> None:
        with self._lock:
            if self._jobs.pop(job.rid, None) is not None and self._process.is_alive():
                self._commands.send(("cancel", job.rid))

    def _read(self) -> None:
        """The engine's events, a step at a time, to `deliver` (or each job's emit), as the in-process engine."""
        while True:
            try:
                batch, self._load = self._events.recv()
            except (EOFError, OSError):
                break
            out = []
            with self._lock:
                for rid, text, logprobs, finish, generated in batch:
                    job = self._jobs.get(rid)
                    if job is None:  # cancelled meanwhile
                        continue
                    job.generated = generated
                    if finish:
                        del self._jobs[rid]
                    out.append((job, Event(text, logprobs, finish)))
            hand_over(self.deliver, out)
        with self._lock:
            left, self._jobs = list(self._jobs.values()), {}
        if left and not self._closing:
            self._process.join(timeout=5)
            code = self._process.exitcode
            hand_over(
                self.deliver, [(job, Event(f"the engine process exited (code {code}).", [], "error")) for job in left]
            )


def _child(source: ModelSource, max_batch, max_len, prefix_cache_bytes, threads, commands, events) -> None:
    """The engine process: load the model, then run requests and cancellations until told to close."""
    import qianwen
    from qianwen.engine import Engine

    # Ctrl-C reaches every process of the terminal's group: the server shuts the engine down itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    try:
        model, tokenizer = qianwen.load(source.path, dtype=source.dtype, device=source.device)
        engine = Engine(model, tokenizer, max_batch, 10**9, max_len, prefix_cache_bytes=prefix_cache_bytes)
    except Exception as exc:  # the server prints it as one sentence and exits
        events.send({"error": str(exc)})
        return
    jobs = {}  # request id -> running or queued job, for cancellations
    registry = threading.Lock()  # a job may finish before its submission has registered it

    def deliver(batch) -> None:
        rows = []
        with registry:
            for job, event in batch:
                rows.append((job.tag, event.text, event.logprobs, event.finish_reason, job.generated))
                if event.finish_reason:
                    jobs.pop(job.tag, None)
        events.send((rows, engine.load))

    engine.deliver = deliver
    sizes = {"max_len": engine.max_len, "cache_bytes": engine.cache_bytes, "prefix": engine.prefix_budget}
    events.send({**sizes, "load": engine.load})
    try:
        while True:
            try:
                message = commands.recv()
            except (EOFError, OSError):
                break
            if message[0] == "submit":
                _, rids, prompt, params = message
                try:
                    with registry:
                        for job in engine.submit(prompt, params, len(rids), lambda job, event: None, tags=rids):
                            jobs[job.tag] = job
                except Exception as exc:  # one request that cannot start ends with an error; the engine goes on
                    message = f"the request could not start: {type(exc).__name__}: {exc}"
                    with registry:
                        for rid in rids:
                            jobs.pop(rid, None)
                    events.send(([(rid, message, [], "error", 0) for rid in rids], engine.load))
            elif message[0] == "cancel":
                with registry:
                    job = jobs.pop(message[1], None)
                if job is not None:
                    job.cancel()
            elif message[0] == "close":
                break
    finally:
        engine.close()
