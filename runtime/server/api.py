"""Request bodies of the HTTP API (OpenAI-compatible and SGLang-compatible), and
how a validation failure is told to the client: one message that names the field
and the fix, in OpenAI's error shape."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

MAX_STOP_STRINGS = 4
DEFAULT_CHAT_MAX_TOKENS = 512  # OpenAI leaves chat uncapped; a CPU server should not
_DOMAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# How to fix a field, appended to its validation message.
FIELD_FIXES = {
    "prompt": "send a non-empty string or a non-empty list of token ids",
    "messages": 'send a non-empty list of {"role": "system"|"user"|"assistant", "content": "..."}',
    "max_tokens": "pass an integer ≥ 1",
    "max_completion_tokens": "pass an integer ≥ 1",
    "max_new_tokens": "pass an integer ≥ 1",
    "temperature": "pass a number from 0 (greedy) to 2",
    "top_p": "omit it or pass 1",
    "stop": f"pass a string or a list of at most {MAX_STOP_STRINGS} non-empty strings",
    "n": "omit it or pass 1",
    "seed": "pass an integer ≥ 0",
    "text": "send exactly one of text or input_ids",
    "input_ids": "send exactly one of text or input_ids",
    "domain": "use at most 64 letters, digits, '_', '.' or '-'",
}


class APIError(Exception):
    """A client error answered with ``status`` and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.status,
            }
        }


def describe_validation(errors: list[Any]) -> APIError:
    """One 400 for FastAPI's RequestValidationError list: the first failing field,
    what is wrong and how to fix it (never echoes strings: they may be prompt text)."""
    if not errors:
        return APIError(400, "the request is invalid")
    error = errors[0]
    loc = [str(p) for p in error.get("loc", ()) if p != "body"]
    kind = error.get("type", "")
    if kind == "json_invalid":
        return APIError(400, "the request body is not valid JSON: send a JSON object")
    msg = str(error.get("msg", "is invalid")).removeprefix("Value error, ")
    if not loc:  # a whole-body rule; its message names the fields
        if kind == "missing":
            return APIError(400, "the request body is missing: send a JSON object")
        return APIError(
            400, msg if kind == "value_error" else f"the request body is invalid: {msg}"
        )
    # Union members and list indexes follow the field name; the field is what the user wrote.
    name = loc[-1] if loc[0] == "sampling_params" and len(loc) > 1 else loc[0]
    where = ".".join(p for p in loc if not p.isdigit() and "[" not in p)
    if kind == "missing":
        msg = "is required"
    if kind == "value_error":  # our own validators: the message already says the fix
        return APIError(400, f"{where}: {msg}", param=where)
    if kind == "extra_forbidden":
        return APIError(
            400,
            f"{where}: is not a parameter of this endpoint; remove it "
            "(/openapi.json has the schema)",
            param=where,
        )
    value = error.get("input")
    got = f" (got {value!r})" if isinstance(value, int | float | bool) and kind != "missing" else ""
    fix = FIELD_FIXES.get(name)
    return APIError(400, f"{where}: {msg}{got}" + (f"; {fix}" if fix else ""), param=where)


def _stop(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    try:
        stop = handler(value)
    except ValidationError:
        raise ValueError('must be a string or a list of strings, e.g. ["\\n\\n"]') from None
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
        raise ValueError(
            f"holds {len(stops)} strings or an empty one: pass a string or a list of at most "
            f"{MAX_STOP_STRINGS} non-empty strings"
        )
    return stop


def stop_list(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def check_domain(domain: str | None, where: str) -> str:
    if domain is None or domain == "":
        return ""
    if not _DOMAIN.match(domain):
        raise APIError(
            400,
            f"{where}: {domain[:70]!r} is not a workload domain tag; {FIELD_FIXES['domain']}",
            param=where,
        )
    return domain


def _only_default(name: str, value: Any, default: Any, why: str) -> None:
    if value != default:
        raise ValueError(f"{name}={value!r} is not supported: {why}")


def _only_value(value: float) -> dict[str, Any]:
    """Schema for a field accepted only at its default: OpenAPI clients see the one value
    this server takes; the validators below still answer other values with a clear 400."""
    return {"enum": [value]}


class _Sampling(BaseModel):
    """Fields shared by the OpenAI endpoints."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, description="Accepted and ignored: this server serves one model."
    )
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy decoding.")
    top_p: float = Field(
        1.0, description="Only 1 (no nucleus truncation).", json_schema_extra=_only_value(1.0)
    )
    n: int = Field(
        1, description="Only 1: one completion per request.", json_schema_extra=_only_value(1)
    )
    stream: bool = Field(False, description="Server-sent events, ending with `data: [DONE]`.")
    stop: str | list[str] | None = Field(
        None, description=f"Up to {MAX_STOP_STRINGS} stop strings."
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Seed for sampling.")
    presence_penalty: float = Field(0.0, description="Only 0.", json_schema_extra=_only_value(0.0))
    frequency_penalty: float = Field(0.0, description="Only 0.", json_schema_extra=_only_value(0.0))
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream_options: dict[str, Any] | None = None

    @field_validator("stop", mode="wrap")
    @classmethod
    def _check_stop(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return _stop(value, handler)

    @field_validator("n")
    @classmethod
    def _one(cls, n: int) -> int:
        _only_default(
            "n", n, 1, "this server returns one completion per request; send n separate requests"
        )
        return n

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, top_p: float) -> float:
        _only_default("top_p", top_p, 1.0, "speculative sampling here keeps the full distribution")
        return top_p

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, value: float) -> float:
        _only_default("penalty", value, 0.0, "penalties would change the target's distribution")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("is not supported: omit it")
        return value


class CompletionRequest(_Sampling):
    """POST /v1/completions (OpenAI)."""

    prompt: str | list[int] = Field(description="Text, or token ids.")
    max_tokens: int = Field(16, ge=1, description="At most --max-new-tokens-limit.")
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if isinstance(value, list) and value and all(isinstance(v, str | list) for v in value):
            raise ValueError("holds several prompts: send one prompt per request")
        try:
            prompt = handler(value)
        except ValidationError:
            raise ValueError("must be a string or a list of token ids (integers ≥ 0)") from None
        if not prompt:
            raise ValueError("is empty: send a non-empty string or list of token ids")
        if isinstance(prompt, list) and min(prompt) < 0:
            raise ValueError(
                f"holds the negative token id {min(prompt)}: token ids are integers ≥ 0"
            )
        return prompt

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        _only_default("echo", self.echo, False, "omit it")
        _only_default("logprobs", self.logprobs, None, "omit it")
        _only_default("best_of", self.best_of, None, "omit it (or use n=1)")
        _only_default("suffix", self.suffix, None, "omit it")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions (OpenAI); the prompt is the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> ChatCompletionRequest:
        _only_default("logprobs", self.logprobs, False, "omit it")
        if self.tools:
            raise ValueError("tools are not supported: omit tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError("response_format other than text is not supported: omit it")
        return self

    @property
    def max_new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_CHAT_MAX_TOKENS


class SamplingParams(BaseModel):
    """SGLang's sampling_params (the supported subset)."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    stop: str | list[str] | None = None
    top_p: float = Field(
        1.0, description="Only 1 (no nucleus truncation).", json_schema_extra=_only_value(1.0)
    )
    top_k: int = Field(
        -1, description="Only -1 (no top-k truncation).", json_schema_extra=_only_value(-1)
    )
    sampling_seed: int | None = Field(None, ge=0, le=2**63 - 1)

    @field_validator("stop", mode="wrap")
    @classmethod
    def _check_stop(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return _stop(value, handler)

    @model_validator(mode="after")
    def _unsupported(self) -> SamplingParams:
        _only_default("top_p", self.top_p, 1.0, "omit it or pass 1")
        _only_default("top_k", self.top_k, -1, "omit it or pass -1")
        return self


class GenerateRequest(BaseModel):
    """POST /generate (SGLang): text or input_ids, sampling_params; Aurora extras pin
    the arm or revision and tag the workload domain."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = None
    input_ids: list[int] | None = None
    sampling_params: SamplingParams = Field(
        default_factory=lambda: SamplingParams.model_validate({})
    )
    stream: bool = False
    rid: str | None = None
    return_logprob: bool = False
    domain: str | None = Field(
        None, description="Workload domain tag copied into traces and stats."
    )
    arm: Literal["stable", "candidate", "baseline"] | None = Field(None, description="Pin an arm.")
    revision: str | None = Field(None, description="Pin a loaded draft revision.")

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateRequest:
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("send exactly one of text or input_ids")
        if self.text == "" or self.input_ids == []:
            raise ValueError("the prompt is empty: send a non-empty text or input_ids")
        if self.input_ids and min(self.input_ids) < 0:
            raise ValueError(f"input_ids holds the negative token id {min(self.input_ids)}")
        _only_default(
            "stream",
            self.stream,
            False,
            "/generate does not stream here; use /v1/completions with stream=true",
        )
        _only_default("return_logprob", self.return_logprob, False, "omit it")
        return self
