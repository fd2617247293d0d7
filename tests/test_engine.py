"""The batching engine without HTTP: requests that join and leave a running batch, each row at its own position,
decode exactly as `qianwen.generate` decodes them alone, with the long-context tricks on; seeds repeat; a
cancelled request leaves; a full engine refuses."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from qianwen.config import ModelConfig
from qianwen.engine import Engine, Overloaded, Params
from qianwen.generate import generate
from qianwen.model import Transformer
from qianwen.prefix_cache import PrefixCache


@pytest.fixture(scope="module")
def model(tok):
    # Short training length, so prompts past it switch dynamic NTK and LogN on; windows on one layer.
    config = ModelConfig(
        vocab_size=tok.vocab_size,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        seq_length=32,
        max_position_embeddings=256,
        use_dynamic_ntk=True,
        use_logn_attn=True,
        attention_windows=[24, 256],
    )
    torch.manual_seed(0)
    m = Transformer(config)
    m.init_weights(0)
    return m.eval()


class Collector:
    def __init__(self):
        self.text: dict[tuple[int, int], str] = {}
        self.finish: dict[tuple[int, int], str] = {}
        self.lock = threading.Lock()
        self.done = threading.Condition(self.lock)

    def __call__(self, tag):
        def emit(job, event):
            with self.lock:
                key = (tag, job.index)
                self.text[key] = self.text.get(key, "") + event.text
                if event.finish_reason:
                    self.finish[key] = event.finish_reason
                    self.done.notify_all()

        return emit

    def wait(self, count: int, timeout: float = 60) -> None:
        with self.done:
            assert self.done.wait_for(lambda: len(self.finish) >= count, timeout)


def test_prompts_arriving_together_are_prefilled_in_one_pass_as_alone(model, tok, monkeypatch):
    """Prompts of different lengths (some past the training length: NTK and LogN per row) and n=2 choices,
    queued while the engine is held, are prefilled right-padded in one forward pass and decode as alone."""
    prompts = [tok.encode("Q: " + "lorem ipsum dolor " * k) for k in (1, 9, 3, 14)]
    passes = []
    real = model.hidden_states
    monkeypatch.setattr(model, "hidden_states", lambda ids, *a: passes.append(ids.shape) or real(ids, *a))
    engine = Engine(model, tok, max_batch=8, max_queue=100)
    out = Collector()
    try:
        with engine._cond:  # the engine thread waits on this lock, so all four are admitted at once
            for i, p in enumerate(prompts):
                engine.submit(p, Params(max_tokens=12, temperature=0), 2 if i == 1 else 1, out(i))
        out.wait(5)
    finally:
        engine.close()
    assert passes == [(4, max(map(len, prompts)))]
    assert max(map(len, prompts)) > 32 > min(map(len, prompts))
    for i, p in enumerate(prompts):
        alone = generate(model, tok, p, 12)
        for k in range(2 if i == 1 else 1):
            assert out.text[(i, k)] == alone.text, (i, k)


def test_joining_and_leaving_rows_decode_as_alone(model, tok):
    prompts = [tok.encode(f"Request {i}: " + "lorem ipsum dolor " * (1 + 3 * (i % 5))) for i in range(12)]
    lengths = [5 + 3 * i for i in range(12)]
    engine = Engine(model, tok, max_batch=5, max_queue=100)
    out = Collector()
    try:
        for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
            engine.submit(p, Params(max_tokens=n, temperature=0), 2 if i % 4 == 0 else 1, out(i))
            time.sleep(0.005)  # arrivals spread over the decoding steps
        out.wait(12 + 3)
    finally:
        engine.close()
    assert max(len(p) for p in prompts) > 32  # some rows run past the training length (NTK, LogN, window)
    for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
        alone = generate(model, tok, p, n)
        for k in range(2 if i % 4 == 0 else 1):
            assert out.text[(i, k)] == alone.text, (i, k)
            assert out.finish[(i, k)] == alone.finish_reason


def test_seeds_repeat_and_choices_differ(model, tok):
    engine = Engine(model, tok, max_batch=4)
    out = Collector()
    try:
        for tag in (0, 1):
            engine.submit(tok.encode("Once upon a time"), Params(max_tokens=12, temperature=1.0, seed=3), 2, out(tag))
        out.wait(4)
    finally:
        engine.close()
    assert out.text[(0, 0)] == out.text[(1, 0)] and out.text[(0, 1)] == out.text[(1, 1)]
    assert out.text[(0, 0)] != out.text[(0, 1)]


def test_requests_sampled_in_one_batch_get_the_text_each_gets_alone(model, tok):
    """Requests with different temperatures, top-p, seeds, penalties and biases picked together in every step
    (greedy ones among them) reply exactly as each does alone in the engine."""
    banned = tok.encode(" the")[0]
    requests = [
        Params(max_tokens=14, temperature=0.8, top_p=0.9, seed=1),
        Params(max_tokens=10, temperature=0),
        Params(max_tokens=12, temperature=1.3, seed=2, presence_penalty=1.5),
        Params(max_tokens=14, temperature=0.5, top_p=0.3, seed=3, logit_bias=((banned, -100.0),)),
        Params(max_tokens=9, temperature=0, frequency_penalty=2.0),
        Params(max_tokens=14, temperature=1.0, seed=4, logprobs=1),
    ]
    prompts = [tok.encode(text) for text in ("Once upon a time", "the the the", "A robot", "Hello", "1 2 3", "Why")]
    engine = Engine(model, tok, max_batch=len(requests))
    try:
        together = Collector()
        for i, (prompt, params) in enumerate(zip(prompts, requests, strict=True)):
            engine.submit(prompt, params, 1, together(i))
        together.wait(len(requests))
        alone = [_run_one(engine, prompt, params)[1] for prompt, params in zip(prompts, requests, strict=True)]
    finally:
        engine.close()
    for i, out in enumerate(alone):
        (text,) = out.text.values()
        assert together.text[(i, 0)] == text, i


def test_penalties_and_logit_bias(model, tok):
    engine = Engine(model, tok, max_batch=2)
    events = []
    banned = tok.encode(" the")[0]
    try:
        params = Params(max_tokens=30, temperature=0, frequency_penalty=2.0, logprobs=2, logit_bias=((banned, -100.0),))
        engine.submit(tok.encode("the the the the"), params, 1, lambda job, e: events.append(e))
        deadline = time.monotonic() + 60
        while not (events and events[-1].finish_reason) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.close()
    tokens = [lp.token_id for e in events for lp in e.logprobs]
    assert banned not in tokens
    assert all(len(lp.top) == 2 and lp.top[0][1] >= lp.top[1][1] for e in events for lp in e.logprobs)


def test_cancel_and_overload(model, tok):
    engine = Engine(model, tok, max_batch=1, max_queue=1)
    try:
        stops = tuple((i, -100.0) for i in [*tok.chat_stop_ids, tok.eod_id])
        never = Params(max_tokens=200, temperature=0, logit_bias=stops)  # runs 200 steps unless cancelled
        (running,) = engine.submit(tok.encode("a"), never, 1, lambda job, e: None)
        engine.submit(tok.encode("b"), never, 1, lambda job, e: None)  # queued
        with pytest.raises(Overloaded):
            engine.submit(tok.encode("c"), never, 1, lambda job, e: None)
        running.cancel()
        deadline = time.monotonic() + 30
        while engine.load["cancelled"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.load["cancelled"] == 1
        with pytest.raises(ValueError, match="max-batch"):
            engine.submit(tok.encode("d"), never, 2, lambda job, e: None)
    finally:
        engine.close()


def test_a_cache_that_does_not_fit_is_one_sentence(model, tok):
    with pytest.raises(ValueError, match=r"needs .* GiB.*lower --max-batch or --max-model-len"):
        Engine(model, tok, max_batch=10**9, max_len=256)


def test_a_failing_step_ends_its_jobs_and_the_engine_goes_on(model, tok, monkeypatch):
    real, calls = model.decode_step, []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "decode_step", fails_once)
    engine = Engine(model, tok, max_batch=2)
    out = Collector()
    try:
        engine.submit(tok.encode("hello"), Params(max_tokens=20, temperature=0), 1, out(0))
        out.wait(1)
        assert out.finish[(0, 0)] == "error" and "boom" in out.text[(0, 0)]
        engine.submit(tok.encode("hello"), Params(max_tokens=5, temperature=0), 1, out(1))
        out.wait(2)
        assert out.finish[(1, 0)] in ("stop", "length") and engine.load["running"] == 0
    finally:
        engine.close()


def _run_one(engine: Engine, prompt: list[int], params: Params, n: int = 1) -> tuple[list, Collector]:
    out = Collector()
    tag = object()
    jobs = engine.submit(prompt, params, n, out(tag))
    out.wait(n)
    return jobs, out


def test_a_cached_prompt_skips_its_prefill_and_a_chat_s_next_turn_prefills_only_its_new_tokens(model, tok, monkeypatch):
    """The prefix cache: a repeated prompt joins a decoding step with its last token and no prefill pass; the next
    turn of a chat (the prompt, the reply the engine kept, a new message) prefills only the new message; a prompt
    past the training length (where dynamic NTK sets the rotary base from the prompt's length) is never reused.
    Every reply is the one `generate` gives the prompt alone."""
    passes = []
    real = model.hidden_states
    monkeypatch.setattr(model, "hidden_states", lambda ids, *a: passes.append(ids.shape) or real(ids, *a))
    greedy = Params(max_tokens=8, temperature=0, logit_bias=tuple((i, -100.0) for i in tok.chat_stop_ids))
    prompt = tok.encode("Q: lorem ipsum dolor sit amet, consectetur adipiscing")
    engine = Engine(model, tok, max_batch=4)
    try:
        (first,), out1 = _run_one(engine, prompt, greedy)
        assert passes == [(1, len(prompt))]
        _, out2 = _run_one(engine, prompt, greedy, n=2)  # both choices from the cache
        assert passes == [(1, len(prompt))] and engine.load["prefix_cache_hits"] == 1
        alone = generate(model, tok, prompt, 8, stop_ids=[])
        assert [*out1.text.values(), *out2.text.values()] == [alone.text] * 3

        fed = prompt + first.sampled[:-1]  # what the finished row holds: the prompt and the reply but its last id
        turn = fed + tok.encode(" sed do eiusmod")
        assert len(fed) >= 16 and 2 * len(fed) >= len(turn) and len(turn) <= model.config.seq_length
        _, out3 = _run_one(engine, turn, greedy)
        assert passes[-1] == (1, len(turn) - len(fed))
        assert engine.load["prefix_cache_reused_tokens"] == (len(prompt) - 1) + len(fed)
        assert list(out3.text.values()) == [generate(model, tok, turn, 8, stop_ids=[]).text]

        long = tok.encode("Q: " + "lorem ipsum dolor " * 12)
        assert len(long) > model.config.seq_length
        for _ in range(2):
            _run_one(engine, long, greedy)
            assert passes[-1] == (1, len(long))
    finally:
        engine.close()


def test_the_prefix_cache_keeps_whole_sequences_within_its_budget():
    def kv(n: int) -> torch.Tensor:
        return torch.zeros(1, 1, n, 4)  # 16 bytes a token, keys and values 32

    cache = PrefixCache(budget_bytes=32 * 10)
    cache.add([1, 2, 3], kv(3), kv(3))
    cache.add([1, 2, 3, 4, 5], kv(5), kv(5))  # begins with the first: the first goes
    assert [e.tokens.tolist() for e in cache.entries.values()] == [[1, 2, 3, 4, 5]] and cache.used == 32 * 5
    cache.add([1, 2], kv(2), kv(2))  # an entry begins with it: nothing new
    assert cache.used == 32 * 5
    assert cache.match([1, 2, 3, 9])[0] == 3 and cache.match([7, 2])[0] == 0
    cache.add([6, 7, 8, 9], kv(4), kv(4))
    cache.match([1, 2])  # used last, so kept when the budget is full
    cache.add([9, 9, 9], kv(3), kv(3))
    assert [e.tokens.tolist() for e in cache.entries.values()] == [[1, 2, 3, 4, 5], [9, 9, 9]]
    assert cache.used <= cache.budget
    cache.add(list(range(20)), kv(20), kv(20))  # larger than the whole budget: not kept
    assert cache.match(list(range(20)))[0] == 0


def test_a_failing_prefill_ends_its_requests_with_an_error(model, tok, monkeypatch):
    real = model.hidden_states
    failures = [RuntimeError("boom")]

    def fails_once(*args, **kwargs):
        if failures:
            raise failures.pop()
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "hidden_states", fails_once)
    engine = Engine(model, tok, max_batch=2, prefix_cache_bytes=0)
    try:
        _, out = _run_one(engine, tok.encode("hello there"), Params(max_tokens=5, temperature=0))
        assert list(out.finish.values()) == ["error"] and "boom" in next(iter(out.text.values()))
        _, out = _run_one(engine, tok.encode("hello there"), Params(max_tokens=5, temperature=0))
        assert next(iter(out.finish.values())) in ("stop", "length") and engine.load["running"] == 0
    finally:
        engine.close()
