"""The engine in a process of its own (what `qianwen serve` runs): the same replies as the engine in a thread,
cancellation, the server-side count that answers 429, a model that does not load as one sentence, and requests
that end with an error when the engine process dies."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import qianwen
from qianwen.config import ModelConfig
from qianwen.engine import Engine, Overloaded, Params
from qianwen.engine_process import EngineProcess, ModelSource, RemoteJob
from qianwen.model import Transformer


class Replies:
    def __init__(self):
        self.text, self.finish, self.lock = {}, {}, threading.Condition()

    def __call__(self, tag):
        def emit(job, event):
            with self.lock:
                self.text[tag, job.index] = self.text.get((tag, job.index), "") + event.text
                if event.finish_reason:
                    self.finish[tag, job.index] = event.finish_reason
                    self.lock.notify_all()

        return emit

    def wait(self, count: int, timeout: float = 60) -> None:
        with self.lock:
            assert self.lock.wait_for(lambda: len(self.finish) >= count, timeout)


@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory):
    config = ModelConfig(
        vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128
    )
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights(0)
    out = tmp_path_factory.mktemp("engine_process") / "model"
    qianwen.save(model, tok, out)
    return out


def test_the_engine_process_replies_as_the_thread_engine_and_cancels_and_refuses(model_dir, tok):
    prompts = [tok.encode(f"Request {i}: " + "lorem ipsum " * i) for i in range(4)]
    greedy = Params(max_tokens=10, temperature=0)
    model, _ = qianwen.load(model_dir)
    local, remote = Engine(model, tok, max_batch=4), EngineProcess(ModelSource(str(model_dir)), 4, max_queue=1)
    expected, got = Replies(), Replies()
    try:
        for i, p in enumerate(prompts):
            local.submit(p, greedy, 2 if i == 1 else 1, expected(i))
            jobs = remote.submit(p, greedy, 2 if i == 1 else 1, got(i))
        expected.wait(5)
        got.wait(5)
        assert got.text == expected.text and got.finish == expected.finish
        assert jobs[0].generated == len(tok.encode(got.text[3, 0])) or got.finish[3, 0] == "length"

        stops = tuple((i, -100.0) for i in [*tok.chat_stop_ids, tok.eod_id])
        never = Params(max_tokens=200, temperature=0, logit_bias=stops)  # runs 200 steps unless cancelled
        running = remote.submit(tok.encode("a"), never, 4, got("long"))
        queued = remote.submit(tok.encode("b"), never, 1, got("queued"))
        with pytest.raises(Overloaded, match="retry later"):
            remote.submit(tok.encode("c"), never, 1, got("refused"))
        for job in running:
            job.cancel()
        got.wait(5 + 1)  # the queued one gets the rows and runs to its length
        assert got.finish["queued", 0] == "length" and ("long", 0) not in got.finish
        assert queued[0].generated == 200
        with pytest.raises(ValueError, match="max-batch"):
            remote.submit(tok.encode("d"), never, 5, got("too many"))

        # Any integer is a seed: one past 64 bits (which stopped the engine process) and a negative one.
        for k, seed in enumerate((2**70, 2**70, -3)):
            remote.submit(tok.encode("g"), Params(max_tokens=6, temperature=1.0, seed=seed), 1, got(("seed", k)))
        got.wait(6 + 3)
        assert {got.finish[("seed", k), 0] for k in range(3)} <= {"length", "stop"}
        assert got.text[("seed", 0), 0] == got.text[("seed", 1), 0]
        # A request the engine cannot start (here a malformed submission, past the server's checks) ends in an
        # error of its own, and the engine serves the next one.
        broken = RemoteJob(remote, next(remote._ids), 0, got("broken"))
        broken.emit = lambda event: got("broken")(broken, event)
        with remote._lock:
            remote._jobs[broken.rid] = broken
            remote._commands.send(("submit", [broken.rid], [1, 2], "not parameters"))
        got.wait(6 + 3 + 1)
        assert got.finish["broken", 0] == "error" and "could not start" in got.text["broken", 0]
        remote.submit(tok.encode("h"), greedy, 1, got("next"))
        got.wait(6 + 3 + 1 + 1)
        assert got.finish["next", 0] in ("length", "stop") and remote.alive

        dying = remote.submit(tok.encode("e"), never, 1, got("dying"))
        time.sleep(0.2)
        remote._process.kill()
        got.wait(6 + 3 + 1 + 1 + 1)
        assert got.finish["dying", 0] == "error" and "engine process exited" in got.text["dying", 0]
        assert not remote.alive
        assert dying[0].generated < 200
        with pytest.raises(Overloaded, match="not running"):
            remote.submit(tok.encode("f"), greedy, 1, got("after"))
    finally:
        local.close()
        remote.close()


def test_a_model_that_does_not_load_is_one_sentence(tmp_path):
    with pytest.raises(ValueError, match="missing"):
        EngineProcess(ModelSource(str(tmp_path / "missing")))
