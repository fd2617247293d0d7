"""The OpenAI-compatible HTTP API over the batching engine (FastAPI):

    GET  /                      the web chat page
    GET  /health                liveness and the engine's load
    GET  /v1/models[/{id}]      the one model served
    POST /v1/chat/completions   chat, streaming, n, logprobs, tools / functions
    POST /v1/completions        text completion

Every error is OpenAI's shape with a 4xx for bad input; a handler never lets an exception out as a 500 for it.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from qianwen.engine import Engine, Event, Job, Overloaded, Params
from qianwen.engine_process import EngineProcess
from qianwen.model import Transformer
from qianwen.serve.chat import ToolStream, interpret, render
from qianwen.serve.protocol import APIError, ChatRequest, CompletionRequest, parse_body
from qianwen.tokenizer import Tokenizer

PAGE = Path(__file__).with_name("page.html")


@dataclass
class Choice:
    """What the handler has of one choice: text so far, log-probabilities, and how it ended."""

    job: Job
    text: str = ""
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None


def create_app(
    model: Transformer | None,
    tokenizer: Tokenizer,
    name: str,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    max_len: int | None = None,
    prefix_cache_bytes: int | None = None,
    engine: Engine | EngineProcess | None = None,
) -> FastAPI:
    """The server. It decodes with `engine` when given (an `EngineProcess`, which owns its own model; the sizes
    are then the engine's), else with a thread engine over `model`."""
    if engine is None:
        engine = Engine(model, tokenizer, max_batch, max_queue, max_len, prefix_cache_bytes=prefix_cache_bytes)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # One wake-up of the event loop per decoding step, not one per request and token.
        loop = asyncio.get_running_loop()
        engine.deliver = lambda events: loop.call_soon_threadsafe(_fan_out, events)
        yield
        engine.close()

    app = FastAPI(title="qianwen", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        message = (
            f"there is no {request.method} {request.url.path}; see GET /v1/models, POST /v1/chat/completions "
            "and POST /v1/completions."
            if exc.status_code in (404, 405)
            else str(exc.detail)
        )
        return JSONResponse(APIError(exc.status_code, message, code="unknown_url").body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        error = APIError(500, f"the server failed on this request: {type(exc).__name__}: {exc}", kind="server_error")
        return JSONResponse(error.body(), status_code=500)

    def check(request: Request, requested: str | None = None) -> None:
        if api_key is not None:
            header = request.headers.get("authorization", "")
            if not secrets.compare_digest(header.encode(), f"Bearer {api_key}".encode()):
                what = "no API key was given" if not header else "the API key is not valid"
                raise APIError(
                    401, f"{what}; send the server's key as 'Authorization: Bearer KEY'.", code="invalid_api_key"
                )
        if requested is not None and requested != name:
            raise APIError(
                404, f"the model {requested!r} does not exist; this server serves {name!r}.", "model", "model_not_found"
            )

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "qianwen"}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        if not engine.alive:  # what a supervisor polls: 503, so it restarts the server
            return JSONResponse({"status": "error", "model": name, "message": "the engine is not running."}, 503)
        return {"status": "ok", "model": name, **engine.load}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str, request: Request) -> dict:
        check(request, model_id)
        return model_card()

    def budget(prompt_len: int, wanted: int | None) -> int:
        window = engine.max_len
        if prompt_len >= window:
            raise APIError(
                400,
                f"the prompt has {prompt_len} tokens but the model's context is {window} tokens, with none left "
                "to answer in; shorten the prompt.",
                "messages",
                "context_length_exceeded",
            )
        if wanted is not None and prompt_len + wanted > window:
            raise APIError(
                400,
                f"the prompt has {prompt_len} tokens and max_tokens is {wanted}, {prompt_len + wanted} in all, "
                f"past the model's context of {window} tokens; lower max_tokens to at most {window - prompt_len}.",
                "max_tokens",
                "context_length_exceeded",
            )
        return wanted if wanted is not None else window - prompt_len

    def params(req, max_tokens: int, stop: tuple[str, ...], logprobs: int | None) -> Params:
        bias = []
        for key, value in (req.logit_bias or {}).items():
            if not key.isdigit() or int(key) >= tokenizer.vocab_size:
                raise APIError(
                    400, f"logit_bias key {key!r} is not a token id below {tokenizer.vocab_size}.", "logit_bias"
                )
            bias.append((int(key), float(value)))
        if req.n > engine.max_batch:
            raise APIError(
                400,
                f"n is {req.n} but this server runs at most {engine.max_batch} choices at once (--max-batch); lower n.",
                "n",
            )
        return Params(
            max_tokens,
            req.temperature,
            req.top_p,
            stop,
            req.seed,
            req.presence_penalty,
            req.frequency_penalty,
            logprobs,
            tuple(bias),
        )

    def submit(prompt: list[int], p: Params, n: int, queue: asyncio.Queue) -> list[Choice]:
        try:
            jobs = engine.submit(prompt, p, n, lambda job, event: queue.put_nowait((job, event)))
        except Overloaded as exc:
            raise APIError(429, f"the server is at capacity: {exc}", code="rate_limit_exceeded") from None
        return [Choice(job) for job in jobs]

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = parse_body(await request.body(), ChatRequest)
        check(request, req.model)
        prompt = render(req, tokenizer)
        max_tokens = budget(len(prompt.ids), req.limit)
        top = (req.top_logprobs or 0) if req.logprobs else None
        queue: asyncio.Queue = asyncio.Queue()
        choices = submit(prompt.ids, params(req, max_tokens, prompt.stop, top), req.n, queue)
        meta = {"id": "chatcmpl-" + secrets.token_hex(12), "created": int(time.time()), "model": name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(_chat_stream(queue, choices, prompt, req.legacy, meta, include_usage, len(prompt.ids)))
        await _collect(request, queue, choices)
        out = []
        for c in choices:
            reply = interpret(prompt, c.text, c.finish_reason)
            message: dict = {"role": "assistant", "content": reply.content}
            finish = reply.finish_reason
            if reply.tool_call is not None and req.legacy:
                message["function_call"], finish = reply.tool_call, "function_call"
            elif reply.tool_call is not None:
                call_id = "call_" + secrets.token_hex(12)
                message["tool_calls"] = [{"id": call_id, "type": "function", "function": reply.tool_call}]
            logprobs = {"content": [_chat_logprob(tokenizer, lp) for lp in c.logprobs]} if top is not None else None
            out.append({"index": c.job.index, "message": message, "logprobs": logprobs, "finish_reason": finish})
        return {"object": "chat.completion", **meta, "choices": out, "usage": _usage(len(prompt.ids), choices)}

    async def _chat_stream(queue, choices, prompt, legacy, meta, include_usage, prompt_len) -> AsyncIterator:
        base = {"object": "chat.completion.chunk", **meta}
        extra = {"usage": None} if include_usage else {}

        def chunk(index: int, delta: dict, finish=None, logprobs=None) -> dict:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return {**base, "choices": [choice], **extra}

        def tool_delta(d: dict) -> dict:
            if "content" in d:
                return {"content": d["content"]}
            if legacy:
                return {"function_call": {"name": d["name"], "arguments": d["arguments"]}}
            call = {"index": 0, "id": d["id"], "type": "function", "function": {"name": d["name"], "arguments": ""}}
            return {"tool_calls": [call]}

        streams = [ToolStream(prompt) if prompt.tools else None for _ in choices]
        for c in choices:
            yield chunk(c.job.index, {"role": "assistant", "content": ""})
        async for c, event in _events(None, queue, choices):
            i, stream = c.job.index, streams[c.job.index]
            lp = {"content": [_chat_logprob(tokenizer, x) for x in event.logprobs]} if event.logprobs else None
            if event.finish_reason == "error":
                yield {"error": APIError(500, event.text, kind="server_error").body()["error"]}
                return
            if stream is None:
                if event.text or lp:
                    yield chunk(i, {"content": event.text}, logprobs=lp)
                if event.finish_reason:
                    yield chunk(i, {}, event.finish_reason)
                continue
            deltas = stream.push(event.text)
            finish = None
            if stream.called:
                c.job.cancel()  # the call is whole: no need to generate up to "Observation:"
                finish = "function_call" if legacy else "tool_calls"
            elif event.finish_reason:
                more, finish = stream.finish(event.finish_reason)
                deltas += more
                if finish == "tool_calls" and legacy:
                    finish = "function_call"
            for d in deltas:
                yield chunk(i, tool_delta(d))
                if "name" in d and not legacy:
                    yield chunk(i, {"tool_calls": [{"index": 0, "function": {"arguments": d["arguments"]}}]})
            if finish:
                c.finish_reason = finish
                yield chunk(i, {}, finish)
        if include_usage:
            yield {**base, "choices": [], "usage": _usage(prompt_len, choices)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse_body(await request.body(), CompletionRequest)
        check(request, req.model)
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs (scoring the prompt) is not supported; use one of them.", "echo")
        # A raw prompt is the caller's whole text, so ChatML markers in it are read as the special tokens they name.
        prompts = [tokenizer.encode(p, allowed_special="all") if isinstance(p, str) else p for p in req.prompts]
        for i, ids in enumerate(prompts):
            if not ids:
                raise APIError(400, f"prompt {i} is empty; give at least one token.", "prompt")
            if max(ids) >= tokenizer.vocab_size:
                raise APIError(
                    400, f"prompt {i} has token id {max(ids)}, past the vocabulary of {tokenizer.vocab_size}.", "prompt"
                )
        queue: asyncio.Queue = asyncio.Queue()
        choices: list[Choice] = []
        for ids in prompts:
            p = params(req, budget(len(ids), req.max_tokens), req.stops, req.logprobs)
            batch = submit(ids, p, req.n, queue)
            for c in batch:
                c.job.index += len(choices)  # choices are numbered across prompts
            choices += batch
        echoes = [tokenizer.decode(ids) if req.echo else "" for ids in prompts for _ in range(req.n)]
        meta = {"id": "cmpl-" + secrets.token_hex(12), "created": int(time.time()), "model": name}
        prompt_tokens = sum(map(len, prompts))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(_completion_stream(queue, choices, echoes, meta, include_usage, prompt_tokens))
        await _collect(request, queue, choices)
        out = []
        for c in choices:
            logprobs = _completion_logprobs(tokenizer, c.logprobs) if req.logprobs is not None else None
            text = echoes[c.job.index] + c.text
            out.append({"index": c.job.index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason})
        return {"object": "text_completion", **meta, "choices": out, "usage": _usage(prompt_tokens, choices)}

    async def _completion_stream(queue, choices, echoes, meta, include_usage, prompt_tokens) -> AsyncIterator:
        base = {"object": "text_completion", **meta}
        extra = {"usage": None} if include_usage else {}
        for c in choices:
            if echoes[c.job.index]:
                yield {**base, "choices": [_text_choice(c.job.index, echoes[c.job.index])], **extra}
        async for c, event in _events(None, queue, choices):
            if event.finish_reason == "error":
                yield {"error": APIError(500, event.text, kind="server_error").body()["error"]}
                return
            logprobs = _completion_logprobs(tokenizer, event.logprobs) if event.logprobs else None
            if event.text or event.finish_reason or logprobs:
                yield {
                    **base,
                    "choices": [_text_choice(c.job.index, event.text, logprobs, event.finish_reason)],
                    **extra,
                }
        if include_usage:
            yield {**base, "choices": [], "usage": _usage(prompt_tokens, choices)}

    return app


def _fan_out(events: list[tuple[Job, Event]]) -> None:
    """On the event loop: each event to its request's queue (a job's `emit` puts it there)."""
    for job, event in events:
        job.emit(event)


def _text_choice(index: int, text: str, logprobs=None, finish=None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def _usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    completion = sum(c.job.generated for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


async def _events(
    request: Request | None, queue: asyncio.Queue, choices: list[Choice]
) -> AsyncIterator[tuple[Choice, Event]]:
    """Each choice's events until all have finished. The jobs are cancelled when the consumer goes away (Starlette
    cancels a stream whose client disconnects) or when `request`, polled here, reports a disconnected client."""
    by_job = {id(c.job): c for c in choices}
    try:
        while any(c.finish_reason is None and not c.job.cancelled for c in choices):
            if request is None:
                job, event = await queue.get()
            else:
                try:
                    job, event = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
            c = by_job[id(job)]
            if c.finish_reason is not None:
                continue
            c.text += event.text
            c.logprobs += event.logprobs
            if event.finish_reason:
                c.finish_reason = event.finish_reason
            yield c, event
    finally:
        for c in choices:
            c.job.cancel()


async def _collect(request: Request, queue: asyncio.Queue, choices: list[Choice]) -> None:
    async for _, event in _events(request, queue, choices):
        if event.finish_reason == "error":
            raise APIError(500, event.text, kind="server_error")


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def lines():
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _token(tokenizer: Tokenizer, token_id: int) -> tuple[str, list[int]]:
    raw = tokenizer.token_bytes(token_id)
    return raw.decode("utf-8", errors="replace"), list(raw)


def _chat_logprob(tokenizer: Tokenizer, lp) -> dict:
    text, raw = _token(tokenizer, lp.token_id)
    top = []
    for token_id, value in lp.top:
        t, b = _token(tokenizer, token_id)
        top.append({"token": t, "logprob": value, "bytes": b})
    return {"token": text, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top}


def _completion_logprobs(tokenizer: Tokenizer, items: list) -> dict:
    tokens = [_token(tokenizer, lp.token_id)[0] for lp in items]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    top = [{_token(tokenizer, i)[0]: v for i, v in lp.top} for lp in items]
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in items],
        "top_logprobs": top,
        "text_offset": offsets,
    }
