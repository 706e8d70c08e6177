"""``expertflow serve``'s HTTP side: an OpenAI-compatible API over one generation worker.

Built on FastAPI and uvicorn: the field's standard ASGI stack (vLLM's OpenAI-compatible server
is built on the same), so OpenAI clients, proxies and load testers work unchanged; pydantic
validates every body and its errors become the API's 400s naming the field; server-sent
events are a plain ``StreamingResponse``. Both are an optional extra (``pip install
'expertflow[serve]'``): only this module imports them, never ``import expertflow``.

Every generation request becomes one request of the :class:`~expertflow.serving.worker.Worker`
(a completion with several prompts, one per prompt), which batches it continuously with the
others. A client that disconnects has its request cancelled at the next round boundary.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from expertflow.serving import openai_api as api
from expertflow.serving.chat_format import chat_ids
from expertflow.serving.loading import Loaded
from expertflow.serving.streaming import TextStream
from expertflow.serving.worker import QueueFull, Stopping, Ticket, Worker

__all__ = ["APIError", "create_app"]


class APIError(Exception):
    """An error answered as OpenAI's JSON error with ``status``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.body = status, api.error_body(message, kind, param, code)


def create_app(loaded: Loaded, worker: Worker) -> FastAPI:
    """The app; its lifespan starts the worker and, at shutdown, cancels what still runs."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(title="expertflow", lifespan=lifespan)
    app.state.worker = worker
    _add_error_handlers(app, worker)
    served = _Served(loaded, worker)

    @app.get("/health")
    async def health():
        return {"status": "ok", "in_flight": worker.in_flight()}

    @app.get("/v1/models")
    async def models():
        card = {"id": loaded.name, "object": "model", "created": int(worker.metrics.started),
                "owned_by": "expertflow", "max_model_len": loaded.context}  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(worker.metrics.render(loaded.name), media_type="text/plain")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: api.ChatRequest, request: Request):
        return await served.chat(body, request)

    @app.post("/v1/completions")
    async def completions(body: api.CompletionRequest, request: Request):
        return await served.complete(body, request)

    return app


def _add_error_handlers(app: FastAPI, worker: Worker) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        worker.metrics.count_http(exc.status)
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, exc: RequestValidationError):
        worker.metrics.count_http(400)
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            error = first.get("ctx", {}).get("error", "")
            body = api.error_body(f"the body is not valid JSON: {error}", "invalid_request_error")
            return JSONResponse(body, status_code=400)
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where or 'the body'}: {first.get('msg', 'invalid')}"
        body = api.error_body(message, "invalid_request_error", where or None)
        return JSONResponse(body, status_code=400)


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class _Served:
    """The generation endpoints: checks, submission, and answers whole or streamed."""

    def __init__(self, loaded: Loaded, worker: Worker):
        self.loaded, self.worker = loaded, worker

    async def chat(self, body: api.ChatRequest, request: Request):
        self._check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids = chat_ids(self.loaded.tokenizer, messages)
        except Exception as exc:  # a template may refuse a role or an order of messages
            message = f"the model's chat template refused the messages: {exc}"
            raise APIError(400, message, param="messages") from exc
        ticket = self._submit(ids, body, "messages")
        rid = api.new_id("chatcmpl")
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return self._streamed(self._chat_events(ticket, body, rid, usage), ticket, request)
        text, finish, made = await self._collect(ticket, body.stops(), request)
        return self._answer(api.chat_response(rid, body.model, text, finish, len(ids), made))

    async def complete(self, body: api.CompletionRequest, request: Request):
        self._check_model(body.model)
        prompts = [self._prompt_ids(p) for p in body.prompts()]
        if not prompts:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if body.stream and len(prompts) > 1:
            raise APIError(400, "stream takes one prompt per request", param="prompt")
        tickets = []
        try:
            for ids in prompts:
                tickets.append(self._submit(ids, body, "prompt"))
        except APIError:
            for ticket in tickets:
                self.worker.cancel(ticket)
            raise
        rid = api.new_id("cmpl")
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            events = self._completion_events(tickets[0], body, rid, usage)
            return self._streamed(events, tickets[0], request)
        results = await asyncio.gather(*(self._collect(t, body.stops(), request) for t in tickets))
        choices = [api.completion_choice(i, r[0], r[1]) for i, r in enumerate(results)]
        made = sum(r[2] for r in results)
        prompt = sum(len(p) for p in prompts)
        return self._answer(api.completion_response(rid, body.model, choices, prompt, made))

    def _answer(self, content: dict) -> JSONResponse:
        self.worker.metrics.count_http(200)
        return JSONResponse(content)

    def _check_model(self, name: str) -> None:
        if name != self.loaded.name:
            message = f"The model `{name}` does not exist; this server serves `{self.loaded.name}`"
            raise APIError(404, message, param="model", code="model_not_found")

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.loaded.tokenizer.encode(prompt))
        vocab = getattr(self.loaded.model.config, "vocab_size", None)
        bad = [t for t in prompt if t < 0 or (vocab is not None and t >= vocab)]
        if bad:
            raise APIError(400, f"prompt has token id {bad[0]}, outside the vocabulary "
                           f"[0, {vocab})", param="prompt")  # fmt: skip
        return prompt

    def _submit(self, ids: list[int], body, param: str) -> Ticket:
        """Checks the prompt against the context and queues it; raises the API's errors."""
        if not ids:
            raise APIError(400, f"{param} has no tokens", param=param)
        context, limit = self.loaded.context, body.limit()
        if context is not None and len(ids) + (limit or 1) > context:
            raise APIError(
                400,
                f"This model's maximum context length is {context} tokens. However, you "
                f"requested {len(ids) + (limit or 1)} tokens ({len(ids)} in the {param}, "
                f"{limit or 1} in the completion). Please reduce the length of the {param} or "
                "the completion.",
                param=param,
                code="context_length_exceeded",
            )
        room = limit or (context - len(ids) if context is not None else 1024)
        try:
            sampling = self.loaded.sampling_for(body.temperature, body.top_p, body.seed)
            return self.worker.submit(ids, room, sampling)
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc
        except QueueFull:
            message = f"the queue is full ({self.worker.max_queue} requests waiting): retry later"
            raise APIError(503, message, "server_busy", code="queue_full") from None
        except Stopping:
            raise APIError(503, "the server is shutting down", "server_busy") from None

    async def _pieces(self, ticket: Ticket, stops: list[str]):
        """``(text, finish)`` as the request's tokens come: text pieces that are final, finish
        None until the last piece; a stop string cancels the request there. Counts the tokens
        in ``ticket.completion_tokens``."""
        stream = TextStream(self.loaded.tokenizer, stops)
        while True:
            token, finish, error = await ticket.events.get()
            if error is not None:
                raise APIError(500, f"generation failed: {error}", "server_error")
            if token is not None:
                ticket.completion_tokens += 1
                piece = stream.push(token)
                if stream.stopped:
                    self.worker.cancel(ticket)
                    yield piece, "stop"
                    return
                if finish is None:
                    yield piece, None
                    continue
                yield piece + stream.finish(), finish
                return
            if finish is not None:
                yield stream.finish(), finish
                return

    async def _collect(self, ticket: Ticket, stops: list[str], request: Request):
        watcher = asyncio.create_task(self._watch(request, ticket))
        try:
            text, finish = [], None
            async for piece, finish in self._pieces(ticket, stops):  # noqa: B007 (the last)
                text.append(piece)
            return "".join(text), finish, ticket.completion_tokens
        finally:
            watcher.cancel()

    async def _watch(self, request: Request, ticket: Ticket) -> None:
        """Cancels the request when its client disconnects (the body was read already: the
        next ASGI message can only be the disconnect)."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                self.worker.cancel(ticket)
                return

    def _streamed(self, events, ticket: Ticket, request: Request) -> StreamingResponse:
        async def body():
            watcher = asyncio.create_task(self._watch(request, ticket))
            try:
                async for chunk in events:
                    yield chunk
            finally:
                watcher.cancel()
                self.worker.cancel(ticket)  # a no-op once it has ended

        self.worker.metrics.count_http(200)
        return StreamingResponse(body(), media_type="text/event-stream")

    async def _chat_events(self, ticket: Ticket, body: api.ChatRequest, rid: str, usage: bool):
        model = body.model
        yield _sse(api.chat_chunk(rid, model, {"role": "assistant", "content": ""}, None))
        try:
            async for piece, finish in self._pieces(ticket, body.stops()):
                if piece:
                    yield _sse(api.chat_chunk(rid, model, {"content": piece}, None))
                if finish is not None:
                    yield _sse(api.chat_chunk(rid, model, {}, finish))
        except APIError as exc:
            yield _sse(exc.body)
        if usage:
            chunk = api.chat_chunk(rid, model, {}, None)
            made = ticket.completion_tokens
            chunk["choices"], chunk["usage"] = [], api.usage(ticket.prompt_tokens, made)
            yield _sse(chunk)
        yield _sse("[DONE]")

    async def _completion_events(self, ticket: Ticket, body, rid: str, usage: bool):
        def chunk(choices: list, extra: dict | None = None) -> str:
            out = {"id": rid, "object": "text_completion", "created": int(time.time()),
                   "model": body.model, "choices": choices, **(extra or {})}  # fmt: skip
            return _sse(out)

        try:
            async for piece, finish in self._pieces(ticket, body.stops()):
                if piece or finish is not None:
                    yield chunk([api.completion_choice(0, piece, finish)])
        except APIError as exc:
            yield _sse(exc.body)
        if usage:
            yield chunk([], {"usage": api.usage(ticket.prompt_tokens, ticket.completion_tokens)})
        yield _sse("[DONE]")
