"""`localgpt serve`: an OpenAI-compatible HTTP server over the batch engine (localgpt/engine.py).

One worker thread owns the model and an Engine of `--parallel` rows; HTTP handlers (FastAPI on uvicorn) turn a
request into a Job of n choices and put it on the worker's queue. The worker admits waiting choices into free rows
between steps (continuous batching: a new request joins at the next step), decodes one token for every running
row per step and hands each token to its job; the handler turns tokens into text (stop strings, UTF-8 across
tokens) and answers, streamed as server-sent events or whole. A client that goes away cancels its job: its rows
are freed at the next step. Beam search (the `num_beams` extension) runs on the worker too, one request at a time,
streaming the best beam's settled text.

Never silently wrong: an unknown field, a field localgpt does not support (`response_format` other than text,
`tools`), a value out of range or a prompt over the context is a 400 with OpenAI's error object naming it; an
unknown model is a 404; a wrong API key a 401.
"""

from __future__ import annotations

import asyncio
import json
import queue
import re
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI
from fastapi import Request as HTTPRequest  # a module-level name: FastAPI resolves the handlers' annotations here
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from localgpt.engine import Engine, Request, TokenEvent
from localgpt.errors import LocalGPTError
from localgpt.generate import TextStream
from localgpt.settings import SETTINGS, GenerationSettings, SettingError, resolve

MAX_BODY_BYTES = 4 * 1024 * 1024  # a request body above this is refused (413) before it is parsed
MAX_CHOICES = 16


class ServeError(LocalGPTError):
    """An HTTP error answered with OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.kind, self.code = status, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


# Request schemas: OpenAI's fields, then the extensions vLLM also accepts in the body. Unknown fields are refused.
class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer to one of them


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionSpec


class StreamOptions(Strict):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class GenerationFields(Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions (vLLM's names): the rest of localgpt's sampling and beam settings
    top_k: int | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    num_beams: int | None = None
    length_penalty: float | None = None
    early_stopping: bool | Literal["never"] | None = None


class ChatRequest(GenerationFields):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(GenerationFields):
    prompt: str | list[str]
    logprobs: int | None = None
    echo: bool = False


SETTING_FIELDS = [name for name in GenerationFields.model_fields if name in SETTINGS]


@dataclass
class Choice:
    """One of a job's n answers, as the worker runs it."""

    index: int
    request: Request
    engine_id: int | None = None
    done: bool = False


@dataclass
class Job:
    """One HTTP request's work: its choices, and where the worker puts their tokens (thread-safe, into the
    handler's event loop)."""

    choices: list[Choice]
    beams: Any  # BeamOptions, or None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    tool_names: list[str] | None = None  # tools the answer may call (chat with tools)
    forced_call: bool = False  # the answer is constrained to be one call

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class Worker(threading.Thread):
    """The one thread that touches the model: it owns the Engine and runs every job."""

    def __init__(self, loaded, parallel: int):
        super().__init__(name="localgpt-worker", daemon=True)
        self.loaded = loaded
        self.engine = Engine(loaded.model, rows=parallel)
        self.inbox: queue.Queue[Job | None] = queue.Queue()
        self.waiting: list[tuple[Job, Choice]] = []
        self.running: dict[int, tuple[Job, Choice]] = {}  # engine id → its job and choice
        self.stopping = False

    def submit(self, job: Job) -> None:
        self.inbox.put(job)

    def stop(self) -> None:
        self.stopping = True
        self.inbox.put(None)

    def run(self) -> None:
        while not self.stopping:
            try:
                self._take(block=not self.running and not self.waiting)
                self._drop_cancelled()
                self._admit()
                if self.running:
                    for event in self.engine.step():
                        self._deliver(event)
            except Exception as error:  # a bug must not leave clients waiting forever: fail what runs, go on
                for job, _ in [*self.running.values(), *self.waiting]:
                    job.put(("error", f"generation failed: {type(error).__name__}: {error}"))
                for engine_id in list(self.running):
                    self.engine.cancel(engine_id)
                self.running.clear()
                self.waiting.clear()
        for job, _ in [*self.running.values(), *self.waiting]:
            job.put(("error", "the server is shutting down"))

    def _take(self, block: bool) -> None:
        while True:
            try:
                job = self.inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if job is None:
                return
            if job.beams is not None:
                self._beam_search(job)
            else:
                self.waiting.extend((job, choice) for choice in job.choices)

    def _drop_cancelled(self) -> None:
        for engine_id, (job, choice) in list(self.running.items()):
            if job.cancelled or choice.done:
                self.engine.cancel(engine_id)
                del self.running[engine_id]
        self.waiting = [(job, choice) for job, choice in self.waiting if not job.cancelled]

    def _admit(self) -> None:
        while self.waiting and self.engine.free_rows:
            job, choice = self.waiting.pop(0)
            try:
                choice.engine_id = self.engine.add(choice.request)
            except LocalGPTError as error:
                job.put(("error", str(error)))
                continue
            self.running[choice.engine_id] = (job, choice)

    def _deliver(self, event: TokenEvent) -> None:
        job, choice = self.running[event.request]
        job.put(("token", choice.index, event))
        if event.finish_reason is not None:
            del self.running[event.request]

    def _beam_search(self, job: Job) -> None:
        """Beam search for one request, here on the worker (its own cache; the batch waits meanwhile)."""
        from localgpt.beam import beam_search, settled_tokens

        request = job.choices[0].request
        model, eos = self.loaded.model, request.eos_ids
        if job.beams.num_return_sequences > 1:  # n beams: all at the end, best first
            hypotheses = beam_search(model, request.prompt_ids, request.sampling, job.beams, request.max_tokens, eos)
            for index, hypothesis in enumerate(hypotheses):
                for position, token in enumerate(hypothesis.tokens):
                    last = position == len(hypothesis.tokens) - 1
                    finish = ("stop" if token in eos else "length") if last else None
                    job.put(("token", index, TokenEvent(0, token, None, [], finish)))
            return
        for token in settled_tokens(model, request.prompt_ids, request.sampling, job.beams, request.max_tokens, eos):
            if job.cancelled:  # the client went away
                return
            job.put(("token", 0, TokenEvent(0, token, None, [], "stop" if token in eos else None)))
            if token in eos:
                return
        job.put(("token", 0, TokenEvent(0, -1, None, [], "length")))


def log(request: HTTPRequest, status: int, started: float) -> None:
    """One line per request on stderr, as an access log: method, path, status, tokens generated, time."""
    milliseconds = (time.perf_counter() - started) * 1000
    print(f"localgpt: {request.method} {request.url.path} {status} {getattr(request.state, 'tokens', 0)} tokens "
          f"{milliseconds:.0f} ms", file=sys.stderr, flush=True)


def openai_error(error: ServeError):
    return JSONResponse(error.body(), status_code=error.status)


def validation_message(error: ValidationError) -> tuple[str, str | None]:
    """The first problem of a request body, in a line that names the field."""
    first = error.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        return f"unknown field '{param}' — localgpt does not support it", param
    if first["type"] == "missing":
        return f"'{param}' is required", param
    return f"'{param}': {first['msg']}", param


def create_app(loaded, worker: Worker, model_id: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="localgpt", docs_url=None, redoc_url=None, openapi_url=None)
    tokenizer, context = loaded.tokenizer, loaded.config.context_length

    @app.middleware("http")
    async def access_log_and_auth(request: HTTPRequest, call_next):
        started = time.perf_counter()
        request.state.tokens = 0
        if api_key is not None and request.url.path != "/health" and \
                request.headers.get("authorization") != f"Bearer {api_key}":
            response = openai_error(ServeError(401, "missing or wrong API key — send 'Authorization: Bearer KEY'",
                                               code="invalid_api_key"))
            log(request, response.status_code, started)
            return response
        response = await call_next(request)
        body = response.body_iterator

        async def logged_at_the_end():  # a streamed answer is logged when its last event has gone
            try:
                async for chunk in body:
                    yield chunk
            finally:
                log(request, response.status_code, started)

        response.body_iterator = logged_at_the_end()
        return response

    @app.exception_handler(ServeError)
    async def serve_error(request: HTTPRequest, error: ServeError):
        return openai_error(error)

    @app.exception_handler(404)
    async def not_found(request: HTTPRequest, error):
        return openai_error(ServeError(404, f"no such endpoint: {request.method} {request.url.path}"))

    @app.exception_handler(405)
    async def wrong_method(request: HTTPRequest, error):
        return openai_error(ServeError(405, f"{request.method} is not allowed on {request.url.path}"))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "localgpt"}]}

    async def read_body(request: HTTPRequest, schema: type[BaseModel]):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise ServeError(413, f"the request body is {int(declared)} bytes; at most {MAX_BODY_BYTES} are taken")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise ServeError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ServeError(400, f"the body is not valid JSON ({error})") from None
        if not isinstance(data, dict):
            raise ServeError(400, "the body must be a JSON object")
        try:
            return schema.model_validate(data)
        except ValidationError as error:
            raise ServeError(400, *validation_message(error)) from None

    def settings_of(body: GenerationFields, max_tokens: int | None) -> GenerationSettings:
        if body.model is not None and body.model != model_id:
            raise ServeError(404, f"model '{body.model}' is not served here (this server has '{model_id}')",
                             param="model", code="model_not_found")
        given = {name: getattr(body, name) for name in SETTING_FIELDS if getattr(body, name) is not None}
        if max_tokens is not None:
            given["max_tokens"] = max_tokens
        if isinstance(given.get("stop"), str):
            given["stop"] = [given["stop"]]
        try:
            return resolve(given, loaded.generation_defaults)
        except SettingError as error:
            raise ServeError(400, str(error), param=next((n for n in given if n in str(error)), None)) from None

    def check_fits(prompt_ids: list[int], settings: GenerationSettings, asked: int | None) -> int:
        if not prompt_ids:
            raise ServeError(400, "the prompt is empty", param="prompt")
        room = context - len(prompt_ids)
        if room <= 0:
            raise ServeError(400, f"the prompt is {len(prompt_ids)} tokens but the model's context is {context} "
                                  "tokens", code="context_length_exceeded")
        if asked is not None and asked > room:
            raise ServeError(400, f"the prompt ({len(prompt_ids)} tokens) and max_tokens ({asked}) exceed the "
                                  f"model's context of {context} tokens", param="max_tokens",
                             code="context_length_exceeded")
        return min(settings.max_tokens, room)

    grammars = []  # built on the first request that needs one (about half a second)

    def constraint_for(response_format: ResponseFormat | None):
        """A fresh constraint per choice for json_object / json_schema, else None."""
        if response_format is None or response_format.type == "text":
            return None
        if response_format.type not in ("json_object", "json_schema"):
            raise ServeError(400, f"response_format '{response_format.type}' is not one of text, json_object, "
                                  "json_schema", param="response_format")
        schema = None
        if response_format.type == "json_schema":
            spec = (response_format.model_extra or {}).get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise ServeError(400, "response_format json_schema needs {'json_schema': {'name': …, 'schema': "
                                      "{…}}}", param="response_format")
            schema = spec.get("schema", {})
        try:
            import llguidance  # noqa: F401
        except ImportError:
            raise ServeError(400, "structured output needs llguidance: pip install 'localgpt-cli[serve]'",
                             param="response_format") from None
        if not grammars:
            from localgpt.constrain import Grammars

            grammars.append(Grammars(tokenizer, loaded.config.vocab_size))
        return lambda: grammars[0].json(schema)

    def make_job(prompt_ids: list[int], settings: GenerationSettings, max_tokens: int, n: int, logprobs: int | None,
                 logit_bias: dict[str, float] | None, constraint=None) -> Job:
        if not 1 <= n <= MAX_CHOICES:
            raise ServeError(400, f"n must be between 1 and {MAX_CHOICES}, not {n}", param="n")
        bias = None
        if logit_bias:
            try:
                bias = {int(token): float(value) for token, value in logit_bias.items()}
            except ValueError:
                raise ServeError(400, "logit_bias keys must be token ids", param="logit_bias") from None
            if any(not 0 <= token < loaded.config.vocab_size for token in bias) or \
                    any(not -100 <= value <= 100 for value in bias.values()):
                raise ServeError(400, "logit_bias takes token ids of this model and values in [-100, 100]",
                                 param="logit_bias")
        beams = settings.beams()
        if beams is not None:
            if logprobs is not None or bias or constraint is not None:
                raise ServeError(400, "logprobs, logit_bias and response_format work with one beam only",
                                 param="num_beams")
            from dataclasses import replace

            beams = replace(beams, num_return_sequences=n).validate() if n > 1 else beams
            if n > 1 and n > beams.num_beams:
                raise ServeError(400, f"n ({n}) cannot exceed num_beams ({beams.num_beams})", param="n")
        choices = []
        for index in range(1 if beams is not None else n):
            sampling = settings.sampling
            if sampling.seed is not None and index:  # n seeded choices: each its own, repeatable draw
                from dataclasses import replace

                sampling = replace(sampling, seed=sampling.seed + index)
            try:
                grammar = constraint() if constraint is not None else None
            except LocalGPTError as error:
                raise ServeError(400, str(error), param="response_format") from None
            choices.append(Choice(index, Request(prompt_ids, sampling, max_tokens, tokenizer.eos_token_ids,
                                                 logprobs, bias, grammar)))
        if beams is not None:
            choices = [Choice(i, choices[0].request) for i in range(n)]
        return Job(choices, beams, asyncio.get_running_loop())

    async def run_job(job: Job, stop: tuple[str, ...], on_delta):
        """Feed the job's tokens through a text layer per choice, calling on_delta(index, text, event, finish)
        as they come; returns each choice's completion-token count."""
        texts = [TextStream(tokenizer, stop) for _ in job.choices]
        counts = [0] * len(job.choices)
        open_choices = set(range(len(job.choices)))
        worker.submit(job)
        try:
            while open_choices:
                item = await job.events.get()
                if item[0] == "error":
                    raise ServeError(500, item[1], kind="server_error")
                _, index, event = item
                if index not in open_choices:
                    continue
                finish = event.finish_reason
                text = ""
                if event.token >= 0 and event.token not in tokenizer.eos_token_ids:
                    counts[index] += 1
                    text = texts[index].add(event.token)
                elif event.token in tokenizer.eos_token_ids:
                    counts[index] += 1
                if texts[index].stopped:
                    finish = "stop"
                    job.choices[index].done = True  # the worker stops decoding it
                if finish is not None:
                    text += texts[index].finish()
                    open_choices.discard(index)
                await on_delta(index, text, event, finish)
        finally:
            if open_choices:  # the client went away, or an error: free the rows
                job.cancelled = True
        return counts

    def tool_plan(body: ChatRequest):
        """(the tools to render into the prompt, the constraint factory for a forced call, the tool names), or
        (None, None, None) without tools. tool_choice "required" or a named function constrain the answer to a
        call, {"name": …, "arguments": {…}} matching the tools' parameter schemas; "auto" lets the model choose
        and reads calls in the <tool_call> form the templates that take tools teach; "none" renders no tools."""
        if not body.tools or body.tool_choice == "none":
            return None, None, None
        if not tokenizer.takes_tools:
            raise ServeError(400, f"the chat template of '{model_id}' does not take tools", param="tools")
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools]
        names = [tool.function.name for tool in body.tools]
        wanted = names
        if isinstance(body.tool_choice, dict):
            name = (body.tool_choice.get("function") or {}).get("name")
            if body.tool_choice.get("type") != "function" or name not in names:
                raise ServeError(400, "tool_choice names no function among the tools", param="tool_choice")
            wanted = [name]
        elif body.tool_choice in (None, "auto"):
            return tools, None, names
        schema = {"anyOf": [{"type": "object", "properties": {"name": {"const": tool.function.name},
                                                             "arguments": tool.function.parameters or
                                                             {"type": "object"}},
                             "required": ["name", "arguments"], "additionalProperties": False}
                            for tool in body.tools if tool.function.name in wanted]}
        return tools, constraint_for(ResponseFormat(type="json_schema", json_schema={"name": "call",
                                                                                    "schema": schema})), names

    def chat_prompt(body: ChatRequest, tools: list[dict] | None) -> list[int]:
        if tokenizer.chat_template is None:
            raise ServeError(400, f"'{model_id}' has no chat template: use /v1/completions", param="messages")
        messages = []
        for message in body.messages:
            content = message.content if isinstance(message.content, str) or message.content is None else \
                "".join(part.text for part in message.content)
            entry = {"role": "system" if message.role == "developer" else message.role, "content": content or ""}
            if message.tool_calls is not None:
                entry["tool_calls"] = message.tool_calls
            if message.tool_call_id is not None:
                entry["tool_call_id"] = message.tool_call_id
            messages.append(entry)
        try:
            return tokenizer.encode_chat(messages, tools=tools)
        except LocalGPTError as error:
            raise ServeError(400, str(error), param="messages") from None

    def token_text(token: int) -> str:
        return tokenizer.decode([token], skip_special_tokens=False)

    def chat_logprobs(event: TokenEvent, top: int | None) -> dict | None:
        if event.logprob is None or event.token < 0:
            return None
        entry = {"token": token_text(event.token), "logprob": event.logprob,
                 "bytes": list(token_text(event.token).encode()),
                 "top_logprobs": [{"token": token_text(t), "logprob": p, "bytes": list(token_text(t).encode())}
                                  for t, p in event.top_logprobs[: top or 0]]}
        return {"content": [entry]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body = await read_body(request, ChatRequest)
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        settings = settings_of(body, asked)
        tools, forced_call, tool_names = tool_plan(body)
        if forced_call is not None and body.response_format is not None and body.response_format.type != "text":
            raise ServeError(400, "a forced tool call and response_format cannot both shape the answer",
                             param="response_format")
        prompt_ids = chat_prompt(body, tools)
        max_tokens = check_fits(prompt_ids, settings, asked)
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= 20:
            raise ServeError(400, "top_logprobs must be in [0, 20]", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        job = make_job(prompt_ids, settings, max_tokens, body.n, logprobs, body.logit_bias,
                       forced_call or constraint_for(body.response_format))
        job.tool_names = tool_names
        job.forced_call = forced_call is not None
        return await answer(request, body, job, settings.stop, len(prompt_ids), "chat.completion", logprobs)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await read_body(request, CompletionRequest)
        if body.echo:
            raise ServeError(400, "echo is not supported by localgpt", param="echo")
        prompt = body.prompt if isinstance(body.prompt, str) else None
        if prompt is None:
            if len(body.prompt) != 1:
                raise ServeError(400, "one prompt per request (a list of several is not supported)", param="prompt")
            prompt = body.prompt[0]
        settings = settings_of(body, body.max_tokens)
        prompt_ids = tokenizer.encode(prompt)
        max_tokens = check_fits(prompt_ids, settings, body.max_tokens)
        if body.logprobs is not None and not 0 <= body.logprobs <= 20:
            raise ServeError(400, "logprobs must be in [0, 20]", param="logprobs")
        job = make_job(prompt_ids, settings, max_tokens, body.n, body.logprobs, body.logit_bias)
        return await answer(request, body, job, settings.stop, len(prompt_ids), "text_completion", body.logprobs)

    async def answer(request: HTTPRequest, body, job: Job, stop, prompt_tokens: int, kind: str,
                     logprobs: int | None):
        identifier = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        chat = kind == "chat.completion"

        def usage(counts: list[int]) -> dict:
            request.state.tokens = sum(counts)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": sum(counts),
                    "total_tokens": prompt_tokens + sum(counts)}

        def completion_logprobs(event: TokenEvent) -> dict | None:
            if event.logprob is None or event.token < 0:
                return None
            return {"tokens": [token_text(event.token)], "token_logprobs": [event.logprob],
                    "top_logprobs": [{token_text(t): p for t, p in event.top_logprobs[: logprobs or 0]}],
                    "text_offset": [0]}

        if not body.stream or job.tool_names:  # with tools the answer is read whole: a call or a message
            texts = [""] * len(job.choices)
            finishes: list[str | None] = [None] * len(job.choices)
            token_logprobs: list[list] = [[] for _ in job.choices]

            async def collect(index, text, event, finish):
                texts[index] += text
                if logprobs is not None and event.logprob is not None:
                    token_logprobs[index].append(event)
                if finish is not None:
                    finishes[index] = finish

            counts = await run_job(job, stop, collect)
            choices = []
            for index, text in enumerate(texts):
                choice: dict[str, Any] = {"index": index, "finish_reason": finishes[index]}
                if chat:
                    choice["message"] = {"role": "assistant", "content": text}
                    if job.tool_names:
                        calls, rest = tool_calls_in(text, job.tool_names, job.forced_call)
                        if calls:
                            choice["message"] = {"role": "assistant", "content": rest or None, "tool_calls": calls}
                            choice["finish_reason"] = "tool_calls"
                    choice["logprobs"] = {"content": [chat_logprobs(e, logprobs)["content"][0]
                                                      for e in token_logprobs[index]]} if logprobs is not None \
                        else None
                else:
                    choice["text"] = text
                    choice["logprobs"] = merge_completion_logprobs([completion_logprobs(e)
                                                                    for e in token_logprobs[index]]) \
                        if logprobs is not None else None
                choices.append(choice)
            result = {"id": identifier, "object": kind, "created": created, "model": model_id, "choices": choices,
                      "usage": usage(counts)}
            if not body.stream:
                return JSONResponse(result)
            return StreamingResponse(whole_as_events(result, bool(body.stream_options and
                                                                  body.stream_options.include_usage)),
                                     media_type="text/event-stream")

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        async def events():
            outgoing: asyncio.Queue = asyncio.Queue()

            async def send(index, text, event, finish):
                await outgoing.put((index, text, event, finish))

            def chunk(choices: list[dict], extra: dict | None = None) -> str:
                data = {"id": identifier, "object": chunk_kind, "created": created, "model": model_id,
                        "choices": choices, **(extra or {})}
                return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                             for i in range(len(job.choices))])
            runner = asyncio.ensure_future(run_job(job, stop, send))
            try:
                while not (runner.done() and outgoing.empty()):
                    getter = asyncio.ensure_future(outgoing.get())
                    done, _ = await asyncio.wait({getter, runner}, return_when=asyncio.FIRST_COMPLETED)
                    if getter not in done:
                        getter.cancel()
                        continue
                    index, text, event, finish = getter.result()
                    if not text and finish is None and not (logprobs is not None and event.logprob is not None):
                        continue
                    if chat:
                        choice = {"index": index, "delta": {"content": text} if text else {},
                                  "logprobs": chat_logprobs(event, logprobs) if logprobs is not None else None,
                                  "finish_reason": finish}
                    else:
                        choice = {"index": index, "text": text, "finish_reason": finish,
                                  "logprobs": completion_logprobs(event) if logprobs is not None else None}
                    yield chunk([choice])
                counts = runner.result()
                if include_usage:
                    yield chunk([], {"usage": usage(counts)})
                yield "data: [DONE]\n\n"
            except ServeError as error:
                yield f"data: {json.dumps(error.body())}\n\n"
            finally:
                job.cancelled = job.cancelled or not runner.done()
                runner.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)


def tool_calls_in(text: str, names: list[str], forced: bool) -> tuple[list[dict], str]:
    """The calls an answer makes, as OpenAI's tool_calls, and the text around them. A forced call is the whole
    answer ({"name", "arguments"}, shaped by the constraint); otherwise calls are read in the <tool_call>{…}
    </tool_call> form the templates that take tools teach (Qwen, Hermes, SmolLM3). A call to an unknown tool, or
    one that does not parse, stays text."""
    found = [text] if forced else TOOL_CALL.findall(text)
    calls = []
    for raw in found:
        try:
            call = json.loads(raw)
        except json.JSONDecodeError:
            continue
        arguments = call.get("arguments", call.get("parameters")) if isinstance(call, dict) else None
        if not isinstance(call, dict) or call.get("name") not in names or not isinstance(arguments, dict):
            continue
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}})
    rest = "" if forced and calls else TOOL_CALL.sub("", text).strip() if calls else text
    return calls, rest


async def whole_as_events(result: dict, include_usage: bool):
    """A whole chat answer as the stream of a chat.completion.chunk: role, the content or the calls, the finish."""
    base = {key: result[key] for key in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    for choice in result["choices"]:
        message, index = choice["message"], choice["index"]
        delta: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
        if message.get("tool_calls"):
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
        for event_choice in ({"index": index, "delta": delta, "finish_reason": None},
                             {"index": index, "delta": {}, "finish_reason": choice["finish_reason"]}):
            yield f"data: {json.dumps({**base, 'choices': [event_choice]}, ensure_ascii=False)}\n\n"
    if include_usage:
        yield f"data: {json.dumps({**base, 'choices': [], 'usage': result['usage']})}\n\n"
    yield "data: [DONE]\n\n"


def merge_completion_logprobs(entries: list[dict | None]) -> dict:
    merged: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for entry in entries:
        if entry is None:
            continue
        for key in ("tokens", "token_logprobs", "top_logprobs"):
            merged[key] += entry[key]
        merged["text_offset"].append(offset)
        offset += len(entry["tokens"][0])
    return merged


def listen(host: str, port: int):
    """The server's socket, bound before the model loads: a busy port is said at once."""
    import os
    import socket

    try:
        return socket.create_server((host, port))
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise LocalGPTError(f"cannot listen on {host}:{port} ({reason})") from None


def serve(loaded, model_id: str, listener, parallel: int, api_key: str | None) -> None:
    """Run until Ctrl-C or SIGTERM (then in-flight requests are cancelled and it returns)."""
    import uvicorn

    worker = Worker(loaded, parallel)
    worker.start()
    app = create_app(loaded, worker, model_id, api_key)
    host, bound = listener.getsockname()[:2]
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3,
                            lifespan="off")
    server = uvicorn.Server(config)
    # uvicorn shuts down on SIGINT and SIGTERM, then raises the signal again for the handler it found. Ours asks
    # the server to stop: for a signal that comes before uvicorn has put its own handlers in place, and so that
    # the raised-again one is a clean exit (0), not a kill by the signal or an "interrupted" error.
    previous = {sig: signal.signal(sig, lambda number, frame: setattr(server, "should_exit", True))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    print(f"localgpt: serving {model_id} on http://{host}:{bound}/v1 ({parallel} parallel sequences)",
          file=sys.stderr, flush=True)
    try:
        server.run(sockets=[listener])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        worker.stop()
        worker.join(timeout=5)
    print("localgpt: stopped", file=sys.stderr, flush=True)

