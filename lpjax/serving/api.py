"""The OpenAI-compatible HTTP API (FastAPI) over a `Scheduler`.

`POST /v1/chat/completions` (the checkpoint's chat template; the reply ends at its end-of-turn token) and
`POST /v1/completions` (text, or token ids), each whole or streamed as server-sent events ending with
`data: [DONE]`; `GET /v1/models`; `GET /health`. Every refusal is the OpenAI error object
`{"error": {"message", "type", "param", "code"}}`: 400 for a bad request (the message names the problem), 429 when
every slot and the queue are taken, 503 when the engine failed or is shutting down.

A request ends at EOS (finish "stop"), at a stop string (the text ends before it, "stop"), after `max_tokens`
("length"), or when its client goes: a client that disconnects frees its slot at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from lpjax.errors import LPJaxError
from lpjax.runtime.slots import RowSampling
from lpjax.serving.scheduler import Event, GenerationRequest, QueueFull, Scheduler
from lpjax.serving.text import TextStream


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """What the API says about the model and needs of it: its `name` (what requests give as `model`), tokenizer,
    context (prompt + new tokens of a request), vocabulary size, and how it runs (`lp` plan, `mesh`)."""

    name: str
    tokenizer: Any
    context: int
    vocab_size: int
    lp: str = ""
    mesh: str = ""


class ApiError(Exception):
    """A refused request: HTTP `status` with the OpenAI error object."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.kind)


def error_response(status: int, message: str, param: str | None = None,
                   kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


# ---------------------------------------------------------------------------------------------- request bodies


def _at_least_one(v: int | None) -> int | None:
    if v is not None and v < 1:
        raise ValueError(f"must be at least 1, got {v}")
    return v


class _Body(BaseModel):
    """Fields both endpoints take. Fields of the OpenAI API that change nothing here are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None
    ignore_eos: bool = False  # as vLLM: generate max_tokens tokens whatever the model says (load tests)
    logprobs: Any = None

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, v):
        return _at_least_one(v)

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v):
        if v < 0:
            raise ValueError(f"must be >= 0 (0 is greedy), got {v}")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v):
        if not 0 <= v <= 1:
            raise ValueError(f"must be in [0, 1], got {v}")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v):
        if v != 1:
            raise ValueError(f"only n=1 (one choice per request) is served, got {v}")
        return v

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v):
        if v not in (None, False):
            raise ValueError("log probabilities are not served")
        return v

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class _TextPart(BaseModel):
    type: str
    text: str = ""


class ChatMessage(BaseModel):
    role: str
    content: str | list[_TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content if p.type == "text")
        return self.content or ""


class ChatBody(_Body):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # the newer name of max_tokens

    @field_validator("messages")
    @classmethod
    def _messages(cls, v):
        if not v:
            raise ValueError("give at least one message")
        return v

    @field_validator("max_completion_tokens")
    @classmethod
    def _max_completion_tokens(cls, v):
        return _at_least_one(v)


class CompletionBody(_Body):
    prompt: str | list[int]
    echo: bool = False

    @field_validator("echo")
    @classmethod
    def _echo(cls, v):
        if v:
            raise ValueError("echo is not served")
        return v


def parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """The request body as `model`, or an ApiError whose message names the first problem."""
    try:
        return model.model_validate_json(raw or b"")
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        where = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "json_invalid":
            raise ApiError(400, f"malformed JSON body: {err.get('ctx', {}).get('error', msg)}") from None
        if not where:
            raise ApiError(400, f"the body must be a JSON object ({msg})") from None
        if err["type"] == "missing":
            raise ApiError(400, f"missing required field '{where}'", where) from None
        raise ApiError(400, f"{where}: {msg}", where) from None


# ---------------------------------------------------------------------------------------------- the app


def build_app(scheduler: Scheduler, served: ServedModel) -> FastAPI:
    app = FastAPI(title="lpjax", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    @app.get("/health")
    async def health():
        stats = scheduler.stats()
        if scheduler.failure:
            return JSONResponse({"status": "failed", "error": scheduler.failure, **stats}, 503)
        return {"status": "ok", **stats}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": served.name, "object": "model", "created": created, "owned_by": "lpjax",
            "max_model_len": served.context, "vocab_size": served.vocab_size, "lp": served.lp, "mesh": served.mesh,
            "steps_per_call": scheduler.steps_per_call,
        }]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = parse_body(await request.body(), ChatBody)
        _check_model(body)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids = served.tokenizer.chat_ids(messages)
        except LPJaxError:
            raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions",
                           "messages") from None
        except Exception as e:  # the template's own refusal (jinja2 raise_exception): a bad conversation
            raise ApiError(400, f"messages: the chat template rejected them ({e})", "messages") from None
        eos = served.tokenizer.end_of_turn_ids
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await _serve(request, body, ids, eos, max_tokens, "messages", chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = parse_body(await request.body(), CompletionBody)
        _check_model(body)
        if isinstance(body.prompt, list):
            ids = list(body.prompt)
            bad = next((i for i in ids if not 0 <= i < served.vocab_size), None)
            if bad is not None:
                raise ApiError(400, f"prompt: token id {bad} is outside the vocabulary (0 to "
                                    f"{served.vocab_size - 1})", "prompt")
        else:
            ids = served.tokenizer.encode(body.prompt)
        return await _serve(request, body, ids, served.tokenizer.eos_ids, body.max_tokens, "prompt", chat=False)

    def _check_model(body: _Body) -> None:
        if body.model != served.name:
            raise ApiError(400, f"model '{body.model}' is not served here; this server serves '{served.name}'",
                           "model")

    async def _serve(request: Request, body: _Body, ids: list[int], eos, max_tokens: int | None, prompt_param: str,
                     chat: bool):
        n, context = len(ids), served.context
        if n == 0:
            raise ApiError(400, f"{prompt_param}: the prompt encodes to no tokens", prompt_param)
        if n >= context:
            raise ApiError(400, f"{prompt_param}: the prompt has {n} tokens; the server's context (--max-len) is "
                                f"{context} tokens, and it must leave room for at least one new token", prompt_param)
        if max_tokens is None:
            max_tokens = context - n
        elif n + max_tokens > context:
            raise ApiError(400, f"max_tokens {max_tokens} plus the prompt's {n} tokens is more than the context of "
                                f"{context} tokens (at most {context - n} here)", "max_tokens")
        seed = body.seed if body.seed is not None else secrets.randbits(32)
        job = GenerationRequest(tuple(ids), max_tokens, RowSampling(body.temperature, body.top_p, seed),
                                frozenset() if body.ignore_eos else frozenset(eos))
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        try:
            ticket = scheduler.submit(job, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        except QueueFull as e:
            raise ApiError(429, f"server busy: {e}", None, "rate_limit_error") from None
        except RuntimeError as e:
            raise ApiError(503, str(e), None, "server_error") from None
        text = TextStream(served.tokenizer, body.stops())
        reply = Reply(chat, served.name, n)
        pieces = _pieces(scheduler, ticket, events, text)
        if body.stream:
            return StreamingResponse(_sse(reply, pieces, text, body.include_usage()), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _whole(request, reply, pieces, text)

    return app


async def _pieces(scheduler: Scheduler, ticket, events: asyncio.Queue, text: TextStream
                  ) -> AsyncIterator[tuple[str, str | None]]:
    """(new text, finish reason or None) as the request's tokens arrive. However it ends (finished, a stop string,
    the client gone), the request is cancelled on the way out: a no-op if it ended, its slot freed if not."""
    try:
        while True:
            event: Event = await events.get()
            if event.error is not None:
                raise ApiError(503, event.error, None, "server_error")
            delta = text.add(event.tokens)
            if text.stopped:
                yield delta, "stop"
                return
            if event.finish is not None:
                yield delta + text.flush(), event.finish
                return
            if delta:
                yield delta, None
    finally:
        scheduler.cancel(ticket)


@dataclasses.dataclass
class Reply:
    """The shape of one reply's JSON: chat or text completion."""

    chat: bool
    model: str
    prompt_tokens: int
    id: str = ""
    created: int = 0

    def __post_init__(self):
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def usage(self, text: TextStream) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": text.tokens,
                "total_tokens": self.prompt_tokens + text.tokens}

    def whole(self, content: str, finish: str, text: TextStream) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": finish}
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice], "usage": self.usage(text)}

    def chunk(self, content: str | None, finish: str | None, role: bool = False) -> dict:
        if self.chat:
            delta = ({"role": "assistant"} if role else {}) | ({} if content is None else {"content": content})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": content or "", "logprobs": None, "finish_reason": finish}
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice]}


async def _whole(request: Request, reply: Reply, pieces, text: TextStream) -> JSONResponse:
    """The reply in one response; if the client goes first, the request is cancelled (its slot freed)."""

    async def collect():
        parts, finish = [], None
        async for piece, end in pieces:
            parts.append(piece)
            finish = end
        return "".join(parts), finish

    async def client_gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(client_gone())
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():  # the client went first: stop reading (`pieces` cancels the request on its way out)
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
    if work.cancelled():
        return error_response(499, "the client closed the connection")
    content, finish = work.result()
    return JSONResponse(reply.whole(content, finish, text))


async def _sse(reply: Reply, pieces, text: TextStream, include_usage: bool) -> AsyncIterator[str]:
    """The reply as server-sent events: chunks of new text, the finish reason, optionally the usage, then [DONE].
    If the client goes, Starlette cancels this generator, and `pieces` cancels the request on its way out."""

    def event(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    try:
        if reply.chat:
            yield event(reply.chunk("", None, role=True))
        async for piece, finish in pieces:
            if piece:
                yield event(reply.chunk(piece, None))
            if finish is not None:
                yield event(reply.chunk(None, finish))
        if include_usage:
            yield event({"id": reply.id, "object": reply.chunk(None, None)["object"], "created": reply.created,
                         "model": reply.model, "choices": [], "usage": reply.usage(text)})
    except ApiError as e:
        yield event({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": None}})
    finally:
        await pieces.aclose()
    yield "data: [DONE]\n\n"
