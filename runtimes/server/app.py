"""The FastAPI app: OpenAI's chat-completions endpoints over one Runtime.

``create_app(runtime, config)`` returns an ASGI app that another app can mount. Every error is
OpenAI's error object: 400 for a request this server cannot honour exactly (named field), 401
without the key, 413 for a body past the limit, 429 with Retry-After when the queue is full, 504
when the time limit passes (in a stream: an error event, then ``[DONE]``).
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ContextOverflowError, EdgeError
from . import render
from .config import ServeConfig
from .engine import Engine, Job
from .limits import BodyLimit
from .metrics import Metrics
from .schema import ChatCompletionRequest, ErrorResponse, validation_message

log = logging.getLogger(__name__)
DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there


class APIError(Exception):
    """An error answered with OpenAI's error object."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}


class Server:
    """What the routes share: the runtime, its engine, the metrics and the settings."""

    def __init__(self, runtime, config: ServeConfig):
        self.runtime, self.config = runtime, config
        self.model = config.model_name or runtime.artifact.path.name
        self.engine = Engine(runtime.generator, config.max_queue, on_finished=self._finished)
        self.metrics = Metrics(queue_depth=self.engine.waiting, active=self.engine.active)
        self.created = int(time.time())

    def _finished(self, job: Job) -> None:
        r = job.result
        ended = "error" if job.error else (
            f"cancelled_{job.stop_reason}" if r.finish_reason in ("", "cancelled") else r.finish_reason)
        started = job.started if job.started is not None else job.arrived
        ttft = (started - job.arrived) + r.token_times[0] if r.token_times else None
        self.metrics.generation(ended, r.prompt_tokens if job.started else 0, r.new_tokens, r.thinking_tokens,
                                ttft, r.decode_tok_s or None)

    def job(self, request: ChatCompletionRequest) -> Job:
        """Validate ``request`` against the runtime (template, context) and make its Job (not yet admitted)."""
        rt = self.runtime
        try:
            ids = rt.prompt_ids([m.to_template() for m in request.messages])
            rt.generator.check_prompt(ids)
            room = rt.max_context - len(ids)
            wanted = request.max_new_tokens()
            sampling = rt.sampling(temperature=request.temperature, top_p=request.top_p, seed=request.seed,
                                   max_new_tokens=min(wanted, room) if wanted else room,
                                   thinking_budget=request.budget(self.config.reasoning_budgets),
                                   stop=request.stops())
        except ContextOverflowError as e:
            raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
        except (EdgeError, ValueError) as e:  # the runtime's own checks (template, sampling ranges)
            raise APIError(400, str(e)) from None
        return Job(ids, sampling, streaming=bool(request.stream))

    def admit(self, job: Job) -> None:
        if not self.engine.submit(job):
            raise APIError(429, f"the server's queue is full ({self.config.max_queue} requests admitted); retry later",
                           kind="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(self.engine.retry_after_s())})
        job.limit(self.config.request_timeout_s)

    def timeout_error(self) -> tuple[str, str, str]:
        return (f"the request took longer than the server's limit of {self.config.request_timeout_s:g} s "
                "(--request-timeout)", "timeout_error", "request_timeout")


def create_app(runtime, config: ServeConfig | None = None) -> FastAPI:
    """An ASGI app serving ``runtime`` (a runtimes.Runtime) by OpenAI's chat-completions protocol."""
    config = config or ServeConfig()
    server = Server(runtime, config)
    app = FastAPI(title="edge-export serve", version="1", lifespan=_lifespan(server),
                  description="OpenAI-compatible chat completions with the thinking in reasoning_content.")
    app.state.server = server
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    _error_handlers(app, server)
    _routes(app, server)
    return app


def _lifespan(server: Server):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, server.engine.close)
    return lifespan


def _error_handlers(app: FastAPI, server: Server) -> None:
    def reply(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
        server.metrics.request(status)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return reply(e.status, render.error_object(e.message, e.kind, e.param, e.code), e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        message, param = validation_message(list(e.errors()))
        return reply(400, render.error_object(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status_code)
        return reply(e.status_code, render.error_object(str(e.detail), kind, code=code), getattr(e, "headers", None))


def _routes(app: FastAPI, server: Server) -> None:
    bearer = HTTPBearer(auto_error=False, description="the key given to --api-key (or EDGE_EXPORT_API_KEY)")

    def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        key = server.config.api_key
        if key and not (credentials and hmac.compare_digest(credentials.credentials.encode(), key.encode())):
            raise APIError(401, "a valid API key is required: send the header Authorization: Bearer KEY",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    errors = {status: {"model": ErrorResponse} for status in (400, 401, 413, 429, 504)}

    @app.get("/health", tags=["server"])
    async def health():
        server.metrics.request(200)
        return {"status": "ok", "model": server.model}

    @app.get("/metrics", tags=["server"], response_class=PlainTextResponse, dependencies=[Depends(authorize)],
             responses={401: {"model": ErrorResponse}})
    async def metrics():
        server.metrics.request(200)
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", tags=["openai"], dependencies=[Depends(authorize)], responses={401: {"model": ErrorResponse}})
    async def models():
        server.metrics.request(200)
        return {"object": "list", "data": [{"id": server.model, "object": "model", "created": server.created,
                                            "owned_by": "edge-export", "max_context": server.runtime.max_context}]}

    @app.post("/v1/chat/completions", tags=["openai"], dependencies=[Depends(authorize)], responses=errors)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        job = server.job(body)
        server.admit(job)
        if body.stream:
            server.metrics.request(200)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(server, job, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(server, job, request)


async def _complete(server: Server, job: Job, request: Request) -> Response:
    """Wait for a non-streamed job, cancelling it if the client leaves."""
    while not job.settled.done():
        await asyncio.wait([job.settled], timeout=DISCONNECT_POLL_S)
        if not job.settled.done() and await request.is_disconnected():
            job.cancel("disconnect")
            server.metrics.request(499)  # nginx's code for "client closed request": nobody reads the reply
            return Response(status_code=499)
    if job.settled.result() == "timeout":
        message, kind, code = server.timeout_error()
        raise APIError(504, message, kind=kind, code=code)
    if job.error is not None:
        raise APIError(500, f"generation failed: {job.error}", kind="server_error")
    if job.stop_reason == "shutdown":
        raise APIError(503, "the server is shutting down", kind="server_error")
    server.metrics.request(200)
    return JSONResponse(render.completion(job.result, render.completion_id(), server.model, int(time.time())))


async def _stream(server: Server, job: Job, include_usage: bool):
    """Server-sent events for a streamed job; leaving (the client disconnects) cancels the job."""
    writer = render.ChunkWriter(render.completion_id(), server.model)
    try:
        yield writer.role()
        while True:
            kind, value = await job.items.get()
            if kind == "event":
                chunk = writer.event(value)
                if chunk:
                    yield chunk
            elif kind == "timeout":
                yield writer.error(*server.timeout_error())
                return
            else:  # end
                if job.error is not None:
                    yield writer.error(f"generation failed: {job.error}", "server_error", "generation_failed")
                elif job.stop_reason == "shutdown":
                    yield writer.error("the server is shutting down", "server_error", "shutdown")
                else:
                    yield writer.finish(job.result, include_usage)
                return
    finally:
        job.cancel("disconnect")  # no-op when the job has finished; the first reason wins otherwise
