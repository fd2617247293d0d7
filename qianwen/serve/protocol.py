"""The OpenAI request bodies the server accepts, checked strictly: a wrong type, an unknown field or an
out-of-range value is a 400 naming the field, never a guess. Errors leave as `APIError`, which the app
answers in OpenAI's shape {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = kind or {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # `strict`, examples and other schema extras pass through
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ToolDef(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedTool(_Strict):
    type: Literal["function"]
    function: NamedFunction


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCall | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    @model_validator(mode="after")
    def _check(self) -> Message:
        if self.role in ("system", "developer", "user") and self.content is None:
            raise ValueError(f"a {self.role} message needs 'content'")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs the 'tool_call_id' of the call it answers")
        if (self.tool_calls or self.function_call) and self.role != "assistant":
            raise ValueError("only assistant messages carry tool calls")
        return self


Stop = str | Annotated[list[str], Field(max_length=4)] | None
Penalty = Annotated[float, Field(ge=-2, le=2)]


class _Sampling(_Strict):
    model: str
    max_tokens: Annotated[int, Field(gt=0)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    n: Annotated[int, Field(ge=1, le=128)] = 1
    stop: Stop = None
    seed: int | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @property
    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stops if s)

    @model_validator(mode="after")
    def _check_stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(gt=0)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedTool | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDef] | None = None
    function_call: Literal["none", "auto"] | NamedFunction | None = None

    @model_validator(mode="after")
    def _check_chat(self) -> ChatRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        if self.tools is not None and self.functions is not None:
            raise ValueError("give tools or the legacy functions, not both")
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(self.tool_choice, NamedTool) and self.tool_choice.function.name not in self.tool_names:
            raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not among the tools")
        if isinstance(self.function_call, NamedFunction) and self.function_call.name not in self.tool_names:
            raise ValueError(f"function_call names {self.function_call.name!r}, which is not among the functions")
        return self

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def functions_list(self) -> list[FunctionDef]:
        return [t.function for t in self.tools] if self.tools else list(self.functions or [])

    @property
    def tool_names(self) -> list[str]:
        return [f.name for f in self.functions_list]

    @property
    def legacy(self) -> bool:
        """Functions given the old way are answered the old way (`function_call`, not `tool_calls`)."""
        return self.functions is not None

    @property
    def choice(self) -> str:
        """ "none", "auto", "required", or the name of the function that must be called."""
        choice = self.function_call if self.legacy else self.tool_choice
        if isinstance(choice, NamedTool):
            return choice.function.name
        if isinstance(choice, NamedFunction):
            return choice.name
        return choice or ("auto" if self.functions_list else "none")


PromptIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Sampling):
    prompt: (
        str | PromptIds | Annotated[list[str], Field(min_length=1)] | Annotated[list[PromptIds], Field(min_length=1)]
    )
    max_tokens: Annotated[int, Field(gt=0)] | None = None
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported; leave it out or set it equal to n")
        if self.suffix:
            raise ValueError("suffix (insertion) is not supported by this model")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


def parse_body(raw: bytes, cls: type[_Strict]) -> Any:
    """The request body as `cls`, or an APIError(400) naming what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {exc.start}); send UTF-8 JSON.") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise APIError(
            400, f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}."
        ) from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(data).__name__}.")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def _validation_error(exc: ValidationError) -> APIError:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("function-", "constrained-")))
    where = where.split(".list[", 1)[0].split(".str", 1)[0].split(".int", 1)[0]
    kind, message = first["type"], first["msg"]
    if kind == "extra_forbidden":
        return APIError(400, f"unrecognized request argument supplied: {where}.", where, "unknown_parameter")
    if kind == "missing":
        return APIError(400, f"'{where}' is a required property.", where, "missing_required_parameter")
    if kind == "value_error":
        return APIError(400, message.removeprefix("Value error, ") + ".", where or None, "invalid_value")
    more = f" ({exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
    return APIError(400, f"invalid '{where}': {message[0].lower() + message[1:]}{more}.", where, "invalid_type")
