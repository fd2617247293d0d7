"""`qianwen chat --url`: the chat loop's backend for a running server, over the OpenAI API (streamed), with the
standard library's HTTP client so that talking to a server needs nothing installed beyond qianwen."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator


class Refused(ValueError):
    """The server turned a message down (too long, bad value); the chat goes on without it."""


class RemoteChat:
    def __init__(self, url: str, api_key: str | None, max_new_tokens: int, options: dict, timeout: float = 600):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--url {url!r} is not an HTTP address; give one like http://127.0.0.1:8000.")
        unsupported = [k for k, off in (("top_k", 0), ("repetition_penalty", 1.0)) if options.get(k, off) != off]
        if unsupported:
            raise ValueError(
                f"--{unsupported[0].replace('_', '-')} is not part of the OpenAI API; leave it out with --url."
            )
        self.base, self.api_key, self.timeout = url.rstrip("/").removesuffix("/v1"), api_key, timeout
        self.max_new_tokens, self.options = max_new_tokens, options
        self.prompt_tokens = 0
        self.model = self._json("GET", "/v1/models")["data"][0]["id"]

    def reply(self, messages: list[dict]) -> Iterator[str]:
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_new_tokens,
            "temperature": self.options.get("temperature", 0.0),
            "top_p": self.options.get("top_p", 1.0),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.options.get("seed") is not None:
            body["seed"] = self.options["seed"]
        if self.options.get("stop"):
            body["stop"] = list(self.options["stop"])[:4]
        response = self._open("POST", "/v1/chat/completions", body)
        return self._deltas(response)

    def _deltas(self, response) -> Iterator[str]:
        with response:
            for raw in response:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise Refused(f"the server failed mid-reply: {chunk['error']['message']}")
                if chunk.get("usage"):
                    self.prompt_tokens = chunk["usage"]["prompt_tokens"]
                for choice in chunk.get("choices", []):
                    text = choice.get("delta", {}).get("content")
                    if text:
                        yield text

    def _json(self, method: str, path: str, body: dict | None = None) -> dict:
        with self._open(method, path, body) as response:
            return json.loads(response.read())

    def _open(self, method: str, path: str, body: dict | None):
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {exc.code} {exc.reason}"
            if exc.code in (401, 404):
                raise ValueError(f"the server at {self.base} answered: {message}") from None
            raise Refused(f"the server answered {exc.code}: {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ValueError(
                f"cannot reach a server at {self.base} ({reason}); start one with `qianwen serve --model DIR`."
            ) from None
