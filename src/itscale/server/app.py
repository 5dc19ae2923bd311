"""The FastAPI app: OpenAI's endpoints in front of itscale's searches.

    POST /v1/chat/completions, POST /v1/completions   a search per request
    GET  /v1/models                                   the model, and its ALGORITHM:MODEL forms
    GET  /health                                      liveness, load, the engine's KV sequences
    GET  /metrics                                     Prometheus text

Every request gets an id (the `x-request-id` response header; the server's log lines say
it). Admission: at most `max_concurrency` searches run at once (they share the engine's
decode rounds); up to `max_queue` more wait; beyond that a 429 with Retry-After. A client
that disconnects, or a request past `request_timeout`, cancels its search, which releases
its KV sequences. Errors are OpenAI's shape with a status that says whose fault it is: 400
a bad field, 401 the API key, 404 the model, 413 the body's size, 429/503 full or shutting
down, 502/504 the upstream server failed or timed out, 500 (never with a traceback) a bug.

Streaming sends SSE: progress comments (`: progress {...}`) while the search runs, the
chosen answer as content chunks, the usage chunk when `stream_options.include_usage`, then
`data: [DONE]`. A single rollout (greedy, or a sampler at budget 1) on the embedded engine
streams its text as it is generated.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from itscale.answers import is_equivalent
from itscale.errors import BackendError, BackendTimeout, ItscaleError, RewardError, UsageError
from itscale.search import make_algorithm
from itscale.search.population import Run
from itscale.server.metrics import Metrics
from itscale.server.requests import APIError, Defaults, SearchRequest, parse_request
from itscale.types import Result

log = logging.getLogger("itscale.server")

ENDS = {"eos": "stop", "answer": "stop", "stop": "stop", "length": "length", "max_steps": "length"}
CHUNK_CHARS = 24  # the chosen answer is streamed in pieces of about this many characters
HEARTBEAT_SECONDS = 5.0


@dataclass
class Limits:
    api_key: str | None = None
    max_concurrency: int = 4
    max_queue: int = 32
    request_timeout: float = 600.0
    max_body_bytes: int = 1 << 20


@dataclass
class Server:
    """What every request shares: the backend, the defaults, the limits and the counters."""

    lm: Any
    judge: Any
    defaults: Defaults
    limits: Limits = field(default_factory=Limits)
    metrics: Metrics = field(default_factory=Metrics)
    running: int = 0
    waiting: int = 0
    shutting_down: bool = False
    live_particles: dict[str, int] = field(default_factory=dict)
    _slots: asyncio.Semaphore | None = None
    _recent_seconds: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.metrics.gauge("requests_running", lambda: self.running)
        self.metrics.gauge("queue_depth", lambda: self.waiting)
        self.metrics.gauge("live_particles", lambda: sum(self.live_particles.values()))
        if hasattr(self.lm, "cached_branches"):
            self.metrics.gauge("kv_sequences", lambda: self.lm.cached_branches)

    # ------------------------------------------------------------------ admission

    @contextlib.asynccontextmanager
    async def admitted(self) -> AsyncIterator[None]:
        if self.shutting_down:
            raise APIError(503, "the server is shutting down: retry on another instance", kind="server_error")
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limits.max_concurrency)
        if self._slots.locked() and self.waiting >= self.limits.max_queue:
            raise APIError(
                429,
                f"the server is full ({self.running} searches running, {self.waiting} waiting): retry later",
                kind="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(self.retry_after())},
            )
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._slots.release()

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead, at the recent search time."""
        recent = self._recent_seconds[-20:]
        each = sum(recent) / len(recent) if recent else 10.0
        return max(1, math.ceil(each * (self.waiting + 1) / self.limits.max_concurrency))

    # ------------------------------------------------------------------ a search

    async def search(
        self,
        request: SearchRequest,
        request_id: str,
        observer: Callable[[Run], None] | None = None,
        stream: Callable[[str], None] | None = None,
    ) -> Result:
        from itscale.api import asolve

        def observe(run: Run) -> None:
            self.live_particles[request_id] = len(run.live())
            if observer is not None:
                observer(run)

        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.limits.request_timeout):
                result = await asolve(
                    request.prompt,
                    request.algorithm,
                    lm=self.lm,
                    reward=request.reward,  # None: the model's default, where the algorithm uses one
                    judge_model=self.judge,
                    settings=request.settings,
                    algorithm_options=request.options,
                    observer=observe,
                    trace=request.trace,
                    stream=stream,
                )
        except TimeoutError:
            raise APIError(
                504, f"the search did not finish within {self.limits.request_timeout:g} s (the server's "
                "--request-timeout): ask for a smaller budget or max_tokens", kind="timeout", code="timeout",
            ) from None  # fmt: skip
        except UsageError as error:
            raise APIError(400, str(error)) from None
        except BackendTimeout as error:
            raise APIError(504, f"the upstream server timed out: {error}", kind="upstream_error") from None
        except (BackendError, RewardError) as error:
            raise APIError(502, f"the upstream server failed: {error}", kind="upstream_error") from None
        except ItscaleError as error:
            if "engine is full" in str(error) or "KV cache is full" in str(error):
                raise APIError(503, f"the engine is full: {error}", kind="server_error") from None
            raise
        finally:
            self.live_particles.pop(request_id, None)
        self._recent_seconds.append(time.perf_counter() - started)
        del self._recent_seconds[:-100]
        u = result.usage
        self.metrics.search(result.algorithm, u.prompt_tokens, u.completion_tokens, u.reward_tokens)
        return result


# ---------------------------------------------------------------------- responses


def choices_of(result: Result, n: int) -> list[tuple[str, str]]:
    """(text, finish_reason) for the algorithm's choice and then the other answers, best
    first by their total weight: the n best distinct final answers (fewer if there are not
    n distinct ones)."""
    particles, weights = result.particles, result.weights
    chosen = next((p for p in particles if p.text == result.text), None)
    out = [(result.text, _finish(chosen))]
    totals: list[tuple[float, str, Any]] = []
    for p, w in zip(particles, weights, strict=True):
        if p.answer is None or (result.answer is not None and is_equivalent(p.answer, result.answer)):
            continue
        for k, (total, answer, best) in enumerate(totals):
            if is_equivalent(p.answer, answer):
                heavier = p if w > weights[particles.index(best)] else best
                totals[k] = (total + w, answer, heavier)
                break
        else:
            totals.append((w, p.answer, p))
    for _, _, p in sorted(totals, key=lambda t: -t[0])[: n - 1]:
        out.append((p.text, _finish(p)))
    return out


def _finish(particle: Any) -> str:
    return ENDS.get(particle.end, "length") if particle is not None and particle.finished else "length"


def usage_of(result: Result) -> dict[str, int]:
    """Every token of every call the search made; reward tokens are counted in the total
    and broken out."""
    u = result.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "reward_tokens": u.reward_tokens,
        "total_tokens": u.total_tokens,
    }


def extension_of(request: SearchRequest, result: Result) -> dict[str, Any]:
    """What the search did, beyond OpenAI's fields."""
    u = result.usage
    out = {
        "algorithm": result.algorithm,
        "budget": request.settings.budget,
        "reward": result.settings.get("reward"),
        "answer": result.answer,
        "particles": [
            {
                "id": p.id,
                "answer": p.answer,
                "weight": w,
                "reward": p.score,
                "finished": p.finished,
                "end": p.end,
                "tokens": p.tokens,
            }
            for p, w in zip(result.particles, result.weights, strict=True)
        ],
        "calls": {"lm": u.lm_calls, "reward": u.reward_calls},
        "seconds": u.seconds,
        "budget_limited": result.budget_limited,
        "diagnostics": result.diagnostics,
    }
    if request.trace:
        out["trace"] = result.trace_dict()
    return out


def body_of(request: SearchRequest, result: Result, request_id: str, created: int) -> dict[str, Any]:
    choices = []
    for i, (text, finish) in enumerate(choices_of(result, request.n)):
        if request.kind == "chat":
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                    "logprobs": None,
                }
            )
        else:
            choices.append({"index": i, "text": text, "finish_reason": finish, "logprobs": None})
    return {
        "id": f"{'chatcmpl' if request.kind == 'chat' else 'cmpl'}-{request_id}",
        "object": "chat.completion" if request.kind == "chat" else "text_completion",
        "created": created,
        "model": request.model,
        "choices": choices,
        "usage": usage_of(result),
        "itscale": extension_of(request, result),
    }


def dumps(value: Any) -> str:
    return json.dumps(value, default=_jsonable, ensure_ascii=False)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(body), status_code=status, media_type="application/json", headers=headers)


# ---------------------------------------------------------------------- the app


def create_app(server: Server) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        server.shutting_down = True  # uvicorn stopped accepting: queued requests get a 503

    app = FastAPI(title="itscale", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> Response:
        return json_response(error.body(), error.status, error.headers)

    @app.middleware("http")
    async def every_request(request: Request, call_next: Callable) -> Response:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex[:16]
        request.state.request_id = request_id
        started = time.perf_counter()
        try:
            if request.url.path.startswith("/v1/"):
                _authorise(request, server.limits.api_key)
            response = await call_next(request)
        except APIError as error:
            response = json_response(error.body(), error.status, error.headers)
        except Exception:  # a bug: logged with its traceback, answered without one
            log.exception("%s %s %s failed", request_id, request.method, request.url.path)
            error = APIError(500, f"internal error (request {request_id}): see the server's log", kind="server_error")
            response = json_response(error.body(), 500)
        response.headers["x-request-id"] = request_id
        if not getattr(request.state, "streaming", False):  # a stream is counted when it ends
            _done(server, request, response.status_code, started)
        return response

    @app.get("/health")
    async def health() -> Response:
        body = {
            "status": "shutting down" if server.shutting_down else "ok",
            "model": server.defaults.model,
            "running": server.running,
            "queued": server.waiting,
        }
        if hasattr(server.lm, "cached_branches"):
            body["kv_sequences"] = server.lm.cached_branches
        return json_response(body, 503 if server.shutting_down else 200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> Response:
        from itscale.search import algorithm_names

        model = server.defaults.model
        ids = [model, *(f"{a}:{model}" for a in algorithm_names())]
        data = [{"id": i, "object": "model", "created": 0, "owned_by": "itscale"} for i in ids]
        return json_response({"object": "list", "data": data})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _complete(server, request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _complete(server, request, "completions")

    @app.exception_handler(404)
    async def not_found(request: Request, exc: Exception) -> Response:
        error = APIError(404, f"no such endpoint: {request.method} {request.url.path}", code="not_found")
        return json_response(error.body(), 404)

    @app.exception_handler(405)
    async def not_allowed(request: Request, exc: Exception) -> Response:
        error = APIError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")
        return json_response(error.body(), 405)

    return app


def _authorise(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(
            401,
            "missing or wrong API key: send the header Authorization: Bearer <key>",
            kind="invalid_request_error",
            code="invalid_api_key",
        )


def _done(server: Server, request: Request, status: int, started: float) -> None:
    seconds = time.perf_counter() - started
    endpoint = request.url.path if request.url.path in _ENDPOINTS else "other"
    server.metrics.request(endpoint, status, seconds)
    log.info("%s %s %s %d %.2fs", request.state.request_id, request.method, request.url.path, status, seconds)


_ENDPOINTS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}


async def _body(request: Request, limit: int) -> Any:
    """The JSON body, read at most `limit` bytes far (413 past it, 400 if not JSON)."""
    declared = request.headers.get("content-length")
    too_big = APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise too_big
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None


async def _complete(server: Server, request: Request, kind: str) -> Response:
    parsed = parse_request(await _body(request, server.limits.max_body_bytes), kind, server.defaults)
    _check_prompt_fits(server, parsed)
    request_id = request.state.request_id
    created = int(time.time())
    if parsed.stream:
        request.state.streaming = True
        return StreamingResponse(
            _events(server, request, parsed, request_id, created),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-request-id": request_id},
        )
    async with server.admitted():
        task = asyncio.create_task(server.search(parsed, request_id))
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                task.cancel()  # the client left: its search stops and frees its KV sequences
                with contextlib.suppress(asyncio.CancelledError, APIError):
                    await task
                log.info("%s client disconnected: search cancelled", request_id)
                return Response(status_code=499)
        result = task.result()
    return json_response(body_of(parsed, result, request_id, created))


def _check_prompt_fits(server: Server, request: SearchRequest) -> None:
    """A prompt longer than the engine's context is a 400 before anything is queued."""
    lm = server.lm
    if not hasattr(lm, "seq_capacity"):
        return
    text = lm.template.prompt_text(request.prompt)
    tokens = len(lm.tokenize(text))
    if tokens >= lm.seq_capacity - 8:
        raise APIError(
            400,
            f"the prompt has {tokens} tokens, more than this engine's context ({lm.seq_capacity})",
            param="messages" if request.kind == "chat" else "prompt",
            code="context_length_exceeded",
        )


async def _events(
    server: Server, request: Request, parsed: SearchRequest, request_id: str, created: int
) -> AsyncIterator[str]:
    """The SSE stream of one search (see the module docstring)."""
    started = time.perf_counter()
    status = 200
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    chunk_id = f"{'chatcmpl' if parsed.kind == 'chat' else 'cmpl'}-{request_id}"
    single = parsed.n == 1 and (parsed.settings.budget == 1 or not make_algorithm(parsed.algorithm).uses_budget)

    def chunk(choices: list[dict], **extra: Any) -> str:
        body = {
            "id": chunk_id,
            "object": "chat.completion.chunk" if parsed.kind == "chat" else "text_completion",
            "created": created,
            "model": parsed.model,
            "choices": choices,
            **extra,
        }
        return f"data: {dumps(body)}\n\n"

    def piece(index: int, text: str, finish: str | None = None) -> dict:
        if parsed.kind == "chat":
            delta = {"content": text} if text else {}
            return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}

    def on_progress(run: Run) -> None:
        tokens = run.usage.completion_tokens + run.usage.reward_tokens
        info = {"step": run.step, "live": len(run.live()), "particles": len(run.particles), "tokens": tokens}
        events.put_nowait(("progress", info))

    def on_text(text: str) -> None:  # from the engine's thread
        loop.call_soon_threadsafe(events.put_nowait, ("text", text))

    task: asyncio.Task | None = None
    try:
        async with server.admitted():
            if parsed.kind == "chat":
                yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            task = asyncio.create_task(server.search(parsed, request_id, on_progress, on_text if single else None))
            task.add_done_callback(lambda _: events.put_nowait(("done", None)))
            streamed, held = "", ""
            stops = parsed.settings.stop
            while True:
                try:
                    kind, value = await asyncio.wait_for(events.get(), HEARTBEAT_SECONDS)
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if kind == "done":
                    break
                if kind == "progress":
                    yield f": progress {dumps(value)}\n\n"
                elif kind == "text":
                    # Hold back what could be the start of a stop string: the answer ends before it.
                    held += value
                    cut = min((i for i in (held.find(s) for s in stops) if i >= 0), default=-1)
                    if cut >= 0:
                        held = held[:cut]
                    keep = max((len(s) - 1 for s in stops), default=0)
                    ready = held if cut >= 0 else held[: len(held) - keep] if keep else held
                    if ready:
                        streamed += ready
                        held = held[len(ready) :]
                        yield chunk([piece(0, ready)])
            result = task.result()
        for index, (text, finish) in enumerate(choices_of(result, parsed.n)):
            rest = text[len(streamed) :] if index == 0 and text.startswith(streamed) else text
            if index == 0 and not text.startswith(streamed):
                log.warning("%s streamed text differs from the chosen answer", request_id)
            for start in range(0, len(rest), CHUNK_CHARS):
                yield chunk([piece(index, rest[start : start + CHUNK_CHARS])])
            yield chunk([piece(index, "", finish)], **({"itscale": extension_of(parsed, result)} if index == 0 else {}))
        if parsed.include_usage:
            yield chunk([], usage=usage_of(result))
        yield "data: [DONE]\n\n"
    except APIError as error:
        status = error.status
        yield f"data: {dumps(error.body())}\n\n"
        yield "data: [DONE]\n\n"
    except asyncio.CancelledError:
        status = 499  # the client went away
        log.info("%s client disconnected: search cancelled", request_id)
        raise
    except Exception:
        status = 500
        log.exception("%s stream failed", request_id)
        error = APIError(500, f"internal error (request {request_id}): see the server's log", kind="server_error")
        yield f"data: {dumps(error.body())}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        _done(server, request, status, started)
