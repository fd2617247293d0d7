"""The OpenAI-compatible server, driven by the official `openai` client and by raw HTTP, on a model that has
learned a few conversations (tests/serving.py), over loopback only."""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from serving import (
    ARGUMENTS,
    COUNT,
    COUNT_REPLY,
    FINAL,
    HELLO,
    HELLO_REPLY,
    MULTIPLY,
    PRODUCT,
    THOUGHT,
    TOOL_QUESTION,
    free_port,
    running_server,
)

import qianwen
from qianwen.cli import main
from qianwen.config import ModelConfig
from qianwen.generate import generate
from qianwen.model import Transformer


@pytest.fixture(scope="module")
def url(chat_model):
    with running_server(chat_model, max_batch=8, max_queue=32) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def ask(client, content, **options):
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": content}], temperature=0, **options
    )


def test_models_and_chat_completion(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    reply = ask(client, HELLO)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == HELLO_REPLY
    assert choice.finish_reason == "stop"
    assert reply.object == "chat.completion" and reply.model == "tiny" and reply.id.startswith("chatcmpl-")
    assert reply.usage.completion_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_text_completion(client, chat_model):
    model, tok = qianwen.load(chat_model)
    prompt = tok.chat_text([{"role": "user", "content": COUNT}])
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0)
    assert out.choices[0].text == COUNT_REPLY
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.prompt_tokens == len(tok.encode(prompt, allowed_special="all"))
    cut = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 3
    assert COUNT_REPLY.startswith(cut.choices[0].text)
    # The same text from the library, token for token.
    assert out.choices[0].text == generate(model, tok, tok.encode(prompt, allowed_special="all"), 40).text


def test_streaming_with_usage(client):
    chunks = list(ask(client, HELLO, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == HELLO_REPLY
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ask(client, HELLO).usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_n_choices_and_seeds(client):
    greedy = ask(client, COUNT, n=2)
    assert [c.index for c in greedy.choices] == [0, 1]
    assert [c.message.content for c in greedy.choices] == [COUNT_REPLY] * 2
    sampled = [
        client.completions.create(model="tiny", prompt="x", max_tokens=8, temperature=1.5, seed=7, n=2)
        for _ in range(2)
    ]
    texts = [[c.text for c in s.choices] for s in sampled]
    assert texts[0] == texts[1]  # a seed makes sampling repeatable
    assert 2 <= sampled[0].usage.completion_tokens <= 16


def test_stop_strings_never_leak(client):
    reply = ask(client, COUNT, stop=[", four"])
    assert reply.choices[0].message.content == "one, two, three"
    assert reply.choices[0].finish_reason == "stop"
    chunks = list(ask(client, COUNT, stop=[", four", "zzz"], stream=True))
    deltas = [c.choices[0].delta.content or "" for c in chunks]
    assert "".join(deltas) == "one, two, three"
    assert not any("," in d and "four" in d for d in deltas)


def test_tool_call_then_answer(client):
    messages = [{"role": "user", "content": TOOL_QUESTION}]
    first = client.chat.completions.create(model="tiny", messages=messages, tools=[MULTIPLY], temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "multiply"
    assert json.loads(call.function.arguments) == ARGUMENTS
    assert choice.message.content == THOUGHT
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": PRODUCT},
    ]
    second = client.chat.completions.create(model="tiny", messages=messages, tools=[MULTIPLY], temperature=0)
    assert second.choices[0].message.content == FINAL
    assert second.choices[0].finish_reason == "stop" and not second.choices[0].message.tool_calls


def test_tool_call_streamed(client):
    messages = [{"role": "user", "content": TOOL_QUESTION}]
    chunks = list(
        client.chat.completions.create(model="tiny", messages=messages, tools=[MULTIPLY], temperature=0, stream=True)
    )
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].id.startswith("call_") and calls[0].function.name == "multiply"
    arguments = "".join(tc.function.arguments or "" for tc in calls)
    assert json.loads(arguments) == ARGUMENTS
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert content == THOUGHT
    call = {"id": calls[0].id, "type": "function", "function": {"name": "multiply", "arguments": arguments}}
    messages += [
        {"role": "assistant", "content": content, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": PRODUCT},
    ]
    final = client.chat.completions.create(
        model="tiny", messages=messages, tools=[MULTIPLY], temperature=0, stream=True
    )
    chunks = list(final)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == FINAL
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_legacy_functions_and_forced_tool_choice(client):
    messages = [{"role": "user", "content": TOOL_QUESTION}]
    legacy = client.chat.completions.create(
        model="tiny", messages=messages, functions=[MULTIPLY["function"]], temperature=0
    )
    assert legacy.choices[0].finish_reason == "function_call"
    assert legacy.choices[0].message.function_call.name == "multiply"
    assert json.loads(legacy.choices[0].message.function_call.arguments) == ARGUMENTS
    named = client.chat.completions.create(
        model="tiny",
        messages=messages,
        tools=[MULTIPLY],
        tool_choice={"type": "function", "function": {"name": "multiply"}},
        temperature=0,
    )
    assert named.choices[0].message.tool_calls[0].function.name == "multiply"
    none = client.chat.completions.create(
        model="tiny", messages=messages, tools=[MULTIPLY], tool_choice="none", temperature=0
    )
    assert not none.choices[0].message.tool_calls


def test_logprobs(client):
    reply = ask(client, HELLO, logprobs=True, top_logprobs=3)
    items = reply.choices[0].logprobs.content
    assert len(items) == reply.usage.completion_tokens
    assert "".join(i.token for i in items) == HELLO_REPLY
    for item in items:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].token == item.token  # greedy picks the likeliest
        assert [t.logprob for t in item.top_logprobs] == sorted((t.logprob for t in item.top_logprobs), reverse=True)


def test_typed_errors(client, url, chat_model):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        ask(client, HELLO, max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="context"):
        ask(client, HELLO, max_tokens=100_000)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": HELLO}])
    with running_server(chat_model, api_key="sesame") as secured:
        wrong = openai.OpenAI(base_url=secured + "/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=secured + "/v1", api_key="sesame", max_retries=0)
        assert right.models.list().data[0].id == "tiny"
        assert httpx.get(secured + "/v1/models").status_code == 401


LONG = "word " * 5000
MALFORMED = [
    ("bad JSON", b'{"model": "tiny", "messages": [', 400, None),
    ("not an object", b"[1, 2]", 400, None),
    ("invalid UTF-8", b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "UTF-8"),
    ("wrong type", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ("n wrong type", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 1.5}, 400, "'n'"),
    ("unknown field", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}, 400, "frobnicate"),
    ("empty messages", {"model": "tiny", "messages": []}, 400, "messages"),
    ("unknown role", {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ("missing model", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ("max_tokens 0", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens negative", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400, "max_tokens"),
    ("huge max_tokens", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}, 400, "1024"),
    ("over-long prompt", {"model": "tiny", "messages": [{"role": "user", "content": LONG}]}, 400, "tokens"),
    ("temperature too high", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 400, "temperature"),
    ("tool result without call", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "x", "content": "1"}]}, 400, "tool"),
    ("call without result", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, 400, "result"),
    ("unknown model", {"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}, 404, "gpt-5"),
    ("n past the batch", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 100}, 400, "max-batch"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "body", "status", "mentions"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_requests(url, name, body, status, mentions):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(url + "/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"].endswith(".") and "Traceback" not in error["message"]
    if mentions:
        assert mentions in error["message"] or mentions.strip("'") == error["param"], error
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_unknown_paths_and_methods(url):
    for method, path, status in [
        ("GET", "/v1/nothing", 404),
        ("GET", "/v1/chat/completions", 405),
        ("POST", "/health", 405),
    ]:
        response = httpx.request(method, url + path)
        assert response.status_code == status
        assert response.json()["error"]["type"] in ("not_found_error", "invalid_request_error")
    bad = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": [[1, 2, 10**7]]})
    assert bad.status_code == 400 and "vocabulary" in bad.json()["error"]["message"]


def test_concurrent_streams_match_one_by_one(chat_model):
    prompts = [f"Say something about the number {i}." + " please" * (i % 4) for i in range(16)]
    with running_server(chat_model, max_batch=16, max_queue=16) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)

        def streamed(prompt: str) -> str:
            chunks = ask(client, prompt, max_tokens=24, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks)

        alone = [streamed(p) for p in prompts]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            together = list(pool.map(streamed, prompts))
    assert together == alone
    assert len(set(alone)) > 1  # the prompts lead to different replies, so rows cannot have been mixed up


@pytest.fixture(scope="module")
def slow_model(tok, tmp_path_factory):
    """Random weights, large enough that a long reply takes seconds: a client can leave while it is generated."""
    config = ModelConfig(vocab_size=tok.vocab_size, hidden_size=256, num_layers=8, num_heads=4, intermediate_size=512)
    model = Transformer(config)
    model.init_weights(0)
    out = tmp_path_factory.mktemp("slow") / "model"
    qianwen.save(model, tok, out)
    return out


def test_disconnected_client_frees_its_row_and_overload_is_429(slow_model, tok):
    never_stop = {str(i): -100 for i in [*tok.chat_stop_ids, tok.eod_id]}  # the reply runs until it is cut off
    with running_server(slow_model, max_batch=1, max_queue=0) as base:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 2000, "stream": True, "logit_bias": never_stop}
        with httpx.stream("POST", base + "/v1/completions", json=body) as response:
            lines = response.iter_lines()  # kept: dropping the iterator would close the connection now
            assert next(lines).startswith("data: ")
            assert httpx.get(base + "/health").json()["running"] == 1
            busy = httpx.post(base + "/v1/completions", json={**body, "stream": False, "max_tokens": 5})
            assert busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error"
        deadline = time.monotonic() + 10
        while httpx.get(base + "/health").json()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        health = httpx.get(base + "/health").json()
        assert health["running"] == 0 and health["cancelled"] == 1 and health["generated_tokens"] < 2000
        again = httpx.post(base + "/v1/completions", json={**body, "stream": False, "max_tokens": 5})
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 5


def test_chat_command_talks_to_a_server(url, chat_model, capsys, monkeypatch):
    lines = [HELLO, "/reset", COUNT, "word " * 3000, "/quit"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", "--url", url, "--max-new-tokens", "40"]) == 0
    out, err = capsys.readouterr()
    assert out == f"{HELLO_REPLY}\n{COUNT_REPLY}\n"
    assert re.findall(r"\[(\d+) prompt tokens", err)  # usage comes back from the server
    (error,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "context" in error  # the over-long message is refused and the chat goes on


def test_chat_command_errors(chat_model, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    port = free_port()  # nothing listens there
    assert main(["chat", "--url", f"http://127.0.0.1:{port}"]) == 2
    assert "cannot reach" in capsys.readouterr().err
    assert main(["chat", "--url", "http://127.0.0.1:1", "--model", str(chat_model)]) == 2
    assert main(["chat", "--url", "127.0.0.1:8000"]) == 2
    assert main(["chat", "--url", "http://127.0.0.1:1", "--top-k", "5"]) == 2
    err = capsys.readouterr().err
    assert [line.startswith("error: ") for line in err.splitlines()] == [True] * 3


def test_serve_command(chat_model):
    port = free_port()
    command = [sys.executable, "-m", "qianwen", "serve", "--model", str(chat_model), "--port", str(port)]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and server.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            time.sleep(0.2)
        health = httpx.get(f"http://127.0.0.1:{port}/health").json()
        assert health["model"] == "model" and health["status"] == "ok"  # served under the directory's name
        assert "<title>qianwen chat</title>" in httpx.get(f"http://127.0.0.1:{port}/").text
        # The command decodes in a process of its own: a streamed reply, then the same prompt from the prefix cache.
        remote = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        for _ in range(2):
            chunks = list(
                remote.chat.completions.create(
                    model="model", messages=[{"role": "user", "content": HELLO}], temperature=0, stream=True
                )
            )
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == HELLO_REPLY
        assert httpx.get(f"http://127.0.0.1:{port}/health").json()["prefix_cache_hits"] == 1
        # Any integer is a seed (one past 64 bits used to stop the engine process).
        huge = {"model": "model", "prompt": HELLO, "max_tokens": 4, "temperature": 1.0, "seed": 2**70}
        assert httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=huge, timeout=60).status_code == 200
        # An engine process that dies (killed here) turns /health into a 503 a supervisor acts on.
        children = [Path(f"/proc/{server.pid}/task/{t}/children") for t in os.listdir(f"/proc/{server.pid}/task")]
        for pid in {int(c) for f in children if f.is_file() for c in f.read_text().split()}:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        down = httpx.get(f"http://127.0.0.1:{port}/health")
        assert down.status_code == 503 and down.json()["status"] == "error"
    finally:
        server.terminate()
        err = server.communicate(timeout=30)[1]
    assert f"serving 'model' at http://127.0.0.1:{port}" in err and "GiB" in err
    assert "Traceback" not in err
    bad = subprocess.run([*command[:-4], "--model", str(chat_model.parent / "missing")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.splitlines()) == 1
